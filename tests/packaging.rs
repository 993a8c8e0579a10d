//! The systemd units in packaging/ pass `systemd-analyze verify` (with the built binary in
//! place of /usr/bin/zdd, which a test machine does not have installed).

mod common;

use common::*;

#[test]
fn units_pass_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        missing(
            "units_pass_systemd_analyze_verify",
            "systemd-analyze not installed (Debian package systemd)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let packaging = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging");
    let bin = zdd_bin();
    let mut units = Vec::new();
    for (src, dst) in [("zdd@.service", "zdd@app.service"), ("zdd@.socket", "zdd@app.socket")] {
        let text = std::fs::read_to_string(format!("{packaging}/{src}")).unwrap();
        let path = dir.path().join(dst);
        std::fs::write(&path, text.replace("/usr/bin/zdd", bin.to_str().unwrap())).unwrap();
        units.push(path);
    }
    let o = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "systemd-analyze verify failed:\n{out}");
    assert!(!out.contains("Unknown") && !out.contains("Failed to parse"), "{out}");
    let service = std::fs::read_to_string(format!("{packaging}/zdd@.service")).unwrap();
    for line in [
        "Type=notify",
        "KillMode=mixed",
        "ExecReload=/usr/bin/zdd reload -c /etc/zdd/%i.toml",
        "TimeoutStopSec=90s",
        "Restart=on-failure",
        "FileDescriptorStoreMax=512",
    ] {
        assert!(service.lines().any(|l| l == line), "{line} missing from zdd@.service");
    }
}
