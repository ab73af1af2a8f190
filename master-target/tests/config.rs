//! The example configuration under deploy/ parses and resolves; bad values are refused.

use std::path::Path;

use master_target::config::Settings;

#[test]
fn deploy_example_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/master-target.toml");
    let cfg = Settings::from_file(&p).unwrap().resolve().unwrap();
    assert_eq!(cfg.retention_hours, 24);
    assert_eq!(cfg.journal_quota_bytes, 64 << 30);
    assert_eq!(cfg.crash_point_interval_ms, 5000);
}

#[test]
fn bad_values_are_named() {
    let e = Settings {
        journal_quota: Some("12 parsecs".into()),
        ..Settings::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(e.contains("journal-quota"), "{e}");
    let e = toml::from_str::<Settings>("listen = \"0.0.0.0:1\"\nretention = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("retention"), "unknown keys are refused: {e}");
}
