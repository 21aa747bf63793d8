//! `unid next`: prints ids from the local agent, one per line in decimal,
//! through the `unid` client library (the shared-memory ring, else the
//! agent's localhost socket).

use anyhow::Context as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The most ids one `unid next` prints.
const IDS_MAX: u64 = 100_000_000;

/// Options of `unid next`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sequence.
    #[arg(default_value = "default")]
    sequence: String,
    /// How many ids to print (1 to 100,000,000).
    #[arg(short = 'n', long = "count", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=IDS_MAX))]
    count: u64,
    /// Folder of the agent's rings [default: $UNID_RING_DIR, else /dev/shm/unid].
    #[arg(long, value_name = "DIR")]
    ring_dir: Option<PathBuf>,
    /// The agent's localhost socket [default: $UNID_SOCKET, else 127.0.0.1:7411].
    #[arg(long, value_name = "ADDR")]
    socket: Option<SocketAddr>,
    /// How long to wait for ids when the agent has none, in ms.
    #[arg(long, default_value_t = 2000)]
    wait_ms: u64,
}

/// Runs `unid next`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut options = unid::Options::default();
    if let Some(d) = args.ring_dir {
        options.ring_dir = d;
    }
    if let Some(s) = args.socket {
        options.socket = s;
    }
    options.wait = Duration::from_millis(args.wait_ms);
    let mut ids = unid::Unid::open_with(&args.sequence, options)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut left = args.count;
    let result = (|| {
        while left > 0 {
            let (first, count) = ids.take_range(left)?;
            for i in 0..count {
                writeln!(out, "{}", first.get() + u128::from(i))?;
            }
            left -= count;
        }
        out.flush()?;
        anyhow::Ok(())
    })();
    match result {
        // `unid next -n 1000 | head`: the reader left; not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        Err(e) if e.downcast_ref::<std::io::Error>().is_some() => {
            Err(e).context("writing to stdout")
        }
        other => other,
    }
}
