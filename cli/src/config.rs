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

#[cfg(test)]
mod tests {
    use super::*;

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
