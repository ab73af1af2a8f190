//! The example configuration under deploy/ parses and resolves; bad values are refused.

use std::path::Path;

use process_server::config::Settings;

#[test]
fn deploy_example_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/process-server.toml");
    let cfg = Settings::from_file(&p).unwrap().resolve().unwrap();
    assert_eq!(cfg.master_targets[0].name, "10.1.2.3");
    let two = Settings {
        master_target: Some("a:1, b:2".into()),
        ..Settings::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(
        two.master_targets
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(Settings {
        master_target: Some("a:1,b:2".into()),
        master_target_name: Some("x".into()),
        ..Settings::default()
    }
    .resolve()
    .is_err());
    assert_eq!(cfg.window_bytes, 64 << 20);
    assert_eq!(cfg.rpo_threshold_s, 900);
}

#[test]
fn bad_values_are_named() {
    let e = Settings {
        max_bandwidth: Some("fast".into()),
        ..Settings::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(e.contains("max-bandwidth"), "{e}");
    let e = Settings {
        compression_level: Some("40".into()),
        ..Settings::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(e.contains("compression-level"), "{e}");
    assert_eq!(
        Settings {
            max_bandwidth: Some("200Mbit".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap()
        .max_bandwidth_bps,
        25_000_000
    );
}
