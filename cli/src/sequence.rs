//! `unid sequence create|list|describe`: UDP requests to the servers given by `--server`
//! (tried in order, redirects to the leader followed), with an error after `--timeout-ms`.

use anyhow::bail;
use std::net::SocketAddr;
use std::path::PathBuf;
use unid_engine::client::{Answer, Client, ClientConfig};
use unid_proto::{ErrorCode, Id, Message, Width};

/// `println!` that ends the process quietly when stdout is closed (e.g. piped into `head`),
/// as a program killed by SIGPIPE would, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}
pub(crate) use out;

/// How long `sequence create` waits for one server's answer: the server's Raft write timeout
/// (2 s) and some.
const CREATE_ATTEMPT_MS: u64 = 2_500;

/// How to reach the cluster (shared by `unid sequence` and `unid status`).
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// A server's UDP address (repeat to give several; they are tried in order).
    #[arg(long = "server", value_name = "ADDR", default_value = "127.0.0.1:7400")]
    pub servers: Vec<SocketAddr>,
    /// File holding the cluster secret, if the cluster uses one.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
}

impl ClusterArgs {
    /// A client of these servers.
    pub fn client(&self) -> anyhow::Result<Client> {
        self.client_waiting(ClientConfig::default().attempt_ms)
    }

    /// A client that waits `attempt_ms` for each answer before asking again (elsewhere).
    pub fn client_waiting(&self, attempt_ms: u64) -> anyhow::Result<Client> {
        let secret = match &self.secret_file {
            Some(path) => Some(crate::config::read_secret(path)?),
            None => None,
        };
        let config = ClientConfig {
            attempt_ms,
            deadline_ms: self.timeout_ms,
            secret,
        };
        Ok(Client::new(&self.servers, config)?)
    }
}

/// `unid sequence` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create a sequence.
    Create {
        /// Its name: 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit.
        name: String,
        /// Width of its ids in bytes: 2, 4, 8 or 16.
        #[arg(long, default_value_t = 8)]
        width: u8,
        /// The first id.
        #[arg(long, default_value_t = 1)]
        start: u128,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List sequences, one name per line.
    List {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Show one sequence: width, start, next id and committed ceiling.
    Describe {
        /// The sequence.
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// A sequence's state as a server reports it.
struct Info {
    name: String,
    width: Width,
    start: Id,
    next: Id,
    ceiling: Id,
}

fn error_text(code: ErrorCode, text: &str, name: &str) -> String {
    let what = match code {
        ErrorCode::AlreadyExists => format!("sequence {name:?} already exists"),
        ErrorCode::UnknownSequence => format!("no sequence named {name:?}"),
        ErrorCode::BadRequest => format!("the server refused the request for {name:?}"),
        other => format!("the server answered {other:?}"),
    };
    if text.is_empty() {
        what
    } else {
        format!("{what}: {text}")
    }
}

fn info_answer(
    name: &str,
) -> impl FnMut(&unid_proto::Frame<'_>, SocketAddr) -> Option<Answer<Result<Info, String>>> + '_ {
    move |frame, _| match frame.message {
        Message::SequenceInfo {
            name: n,
            width,
            start,
            next,
            ceiling,
        } if n == name => Some(Answer::Done(Ok(Info {
            name: n.to_owned(),
            width,
            start,
            next,
            ceiling,
        }))),
        Message::Error {
            code: ErrorCode::NotReady,
            ..
        } => Some(Answer::Retry),
        Message::Error { code, text, .. } => Some(Answer::Done(Err(error_text(code, text, name)))),
        _ => None,
    }
}

fn print_info(i: &Info) {
    let left = i.width.limit().saturating_sub(i.next);
    out!("name:     {}", i.name);
    out!("width:    {} bytes", i.width.bytes());
    out!("start:    {}", i.start);
    out!("next:     {}", i.next);
    out!("ceiling:  {}", i.ceiling);
    out!(
        "left:     {} ids ({:.6}% of the width)",
        left,
        left as f64 / i.width.limit() as f64 * 100.0
    );
}

/// Runs a `unid sequence` subcommand.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Create {
            name,
            width,
            start,
            cluster,
        } => {
            let Some(w) = Width::from_bytes(width) else {
                bail!("--width must be 2, 4, 8 or 16, not {width}");
            };
            if !w.contains(start) {
                bail!(
                    "--start {start} is not below the {width}-byte limit {}",
                    w.limit()
                );
            }
            unid_proto::SequenceName::check(&name)
                .map_err(|e| anyhow::anyhow!("bad sequence name {name:?}: {e}"))?;
            // A create is a Raft write (up to 2 s without a quorum): wait for its answer
            // rather than send it again, which would answer "already exists" if the first
            // one committed.
            let mut client = cluster.client_waiting(CREATE_ATTEMPT_MS)?;
            let msg = Message::SequenceCreate {
                name: &name,
                width: w,
                start,
            };
            match client.call(0, &msg, info_answer(&name))? {
                Ok(info) => {
                    out!("created sequence {}", info.name);
                    print_info(&info);
                    Ok(())
                }
                Err(e) => bail!("{e}"),
            }
        }
        Command::Describe { name, cluster } => {
            let mut client = cluster.client()?;
            let msg = Message::SequenceDescribe { name: &name };
            match client.call(0, &msg, info_answer(&name))? {
                Ok(info) => {
                    print_info(&info);
                    Ok(())
                }
                Err(e) => bail!("{e}"),
            }
        }
        Command::List { cluster } => {
            let mut client = cluster.client()?;
            for name in list(&mut client)? {
                out!("{name}");
            }
            Ok(())
        }
    }
}

/// Every sequence name, asking page after page (at most 10,000 pages).
pub fn list(client: &mut Client) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for _ in 0..10_000 {
        let after = names.last().cloned();
        let msg = Message::SequenceList {
            after: after.as_deref(),
        };
        let (page, more) = client.call(0, &msg, |frame, _| match frame.message {
            Message::SequenceListReply { names, more } => Some(Answer::Done((
                names.iter().map(str::to_owned).collect::<Vec<_>>(),
                more,
            ))),
            _ => None,
        })?;
        let got = page.len();
        names.extend(page);
        if !more || got == 0 {
            return Ok(names);
        }
    }
    bail!("more than 10,000 pages of sequences")
}
