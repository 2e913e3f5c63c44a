//! Security regressions at the gateway: a blank admin key is refused.

mod common;

use lastmile_gateway::{GatewayConfig, TenantsConfig};

fn temp_db(tag: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("lastmile-gw-security-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("usage.db")
}

#[test]
fn a_blank_admin_key_is_refused() {
    for blank in ["", "  \t"] {
        let mut config = GatewayConfig::new(vec!["http://127.0.0.1:1".into()]);
        let mut tenants = TenantsConfig::new(temp_db("blank"));
        tenants.admin_key = Some(blank.into());
        config.tenants = Some(tenants);
        let err = config.validate().expect_err("refused");
        assert!(err.to_string().contains("admin key is empty"), "{err}");
    }
}
