//! Loading TOML configuration files with errors that name the file and key.

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads `path` as TOML into `T`. Unknown keys are errors when `T` says
/// `#[serde(deny_unknown_fields)]`; the message names the file, the key and
/// the line.
#[allow(dead_code)] // used by the server and agent subcommands as they land
pub fn load<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    parse(&text).with_context(|| format!("in config file {}", path.display()))
}

/// Parses TOML text into `T`; the error names the offending key.
pub fn parse<T: DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
}

/// The shortest cluster secret accepted, in bytes (after trimming): 128 bits of a random key.
pub const SECRET_BYTES_MIN: usize = 16;

/// Reads the cluster secret from `path`, trimmed at both ends (servers, agents and tools
/// trim alike, so one file gives one key). Refuses an empty or short secret and a file that
/// its group or others may read or write: a secret anyone on the host can read
/// authenticates anyone.
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt as _;
    let bytes =
        std::fs::read(path).with_context(|| format!("reading secret file {}", path.display()))?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        anyhow::bail!("secret file {} is empty", path.display());
    }
    if trimmed.len() < SECRET_BYTES_MIN {
        anyhow::bail!(
            "secret file {} holds {} bytes; a secret needs at least {SECRET_BYTES_MIN} \
             (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display(),
            trimmed.len()
        );
    }
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading secret file {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "secret file {} has mode {:04o}: others may read it; `chmod 600` it",
            path.display(),
            mode & 0o7777
        );
    }
    Ok(trimmed.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_long_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("unid-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(" \n", 0o600);
        assert!(format!("{:#}", read_secret(&path).unwrap_err()).contains("empty"));
        write("x\n", 0o600);
        assert!(format!("{:#}", read_secret(&path).unwrap_err()).contains("at least 16"));
        write("  sixteen bytes!!!  \n", 0o644);
        let err = format!("{:#}", read_secret(&path).unwrap_err());
        assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");
        write("  sixteen bytes!!!  \n", 0o640);
        assert!(read_secret(&path).is_err());
        write("  sixteen bytes!!!  \n", 0o400);
        assert_eq!(read_secret(&path).unwrap(), b"sixteen bytes!!!");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        listen: String,
        lease_ms: u64,
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let err = parse::<Example>("listen = \"x\"\nlease_ms = 5\nleese_ms = 3\n").unwrap_err();
        assert!(format!("{err}").contains("leese_ms"), "{err}");
        let err = parse::<Example>("listen = \"x\"\nlease_ms = \"five\"\n").unwrap_err();
        assert!(format!("{err}").contains("lease_ms"), "{err}");
        let err = parse::<Example>("listen = \"x\"\n").unwrap_err();
        assert!(format!("{err}").contains("lease_ms"), "{err}");
        assert_eq!(
            parse::<Example>("listen = \"x\"\nlease_ms = 5\n")
                .unwrap()
                .lease_ms,
            5
        );
    }
}
