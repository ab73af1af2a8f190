//! Loading a service's TOML configuration file: one loader for every service, so every
//! service reports a missing file, a syntax error or an unknown key the same way (the
//! path, then the line and column toml names, then what is wrong).

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads `path` as TOML into `T` (its own serde attributes decide defaults and whether
/// unknown keys are refused).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::InvalidParameter {
        param: "config",
        reason: format!("{}: {e}", path.display()),
    })?;
    toml::from_str(&text).map_err(|e| Error::InvalidParameter {
        param: "config",
        reason: format!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct S {
        #[allow(dead_code)]
        a: Option<u32>,
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        let missing = load_toml::<S>(&p).unwrap_err().to_string();
        assert!(
            missing.contains("x.toml") && missing.contains("No such file"),
            "{missing}"
        );
        std::fs::write(&p, "a = 1\nb = 2\n").unwrap();
        let unknown = load_toml::<S>(&p).unwrap_err().to_string();
        assert!(
            unknown.contains("x.toml") && unknown.contains("unknown field `b`"),
            "{unknown}"
        );
        std::fs::write(&p, "a = 1\n").unwrap();
        assert_eq!(load_toml::<S>(&p).unwrap().a, Some(1));
    }
}
