//! Shared set-up of the integration tests: a runtime in a temporary state
//! directory, or a loud skip when KVM or the guest template is missing
//! (never on CI, where that is a failure).

#![allow(dead_code)]

use std::path::Path;

use dormouse::{Command, CommandHandle, Running, Runtime, Sandbox};

/// The template every test boots.
pub const TEMPLATE: &str = "python";

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (or, on CI, fails) when a prerequisite is missing.
pub fn require(what: &str) {
    if on_ci() {
        panic!("CI=true but {what}; CI must build and provide everything (run scripts/test)");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPING TEST: {what}");
    eprintln!("!!! run scripts/test to build the guest image and run every test");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
}

/// A runtime over a fresh state directory, if KVM and the template exist.
pub async fn runtime(state: &Path) -> Option<Runtime> {
    if !Path::new("/dev/kvm").exists() {
        require("/dev/kvm is missing");
        return None;
    }
    let rt = Runtime::open(state).await.expect("open runtime");
    if let Err(e) = rt.template(TEMPLATE) {
        require(&format!("the {TEMPLATE} template is not available: {e}"));
        return None;
    }
    Some(rt)
}

/// The config of a sandbox a test uses longer than the default 5-minute
/// timeout.
pub fn long_lived() -> dormouse::SandboxConfig {
    dormouse::SandboxConfig::default().timeout(std::time::Duration::from_secs(3600))
}

/// What `GET /hello.txt` returns from [`start_hello_server`].
pub const HELLO: &str = "hello from the guest\n";

/// Writes `/srv/www/hello.txt` ([`HELLO`]) and starts `python3 -m
/// http.server` on the guest's loopback port 8000, serving that directory.
pub async fn start_hello_server(sbx: &Sandbox<Running>) -> CommandHandle {
    sbx.files()
        .write("/srv/www/hello.txt", HELLO)
        .await
        .expect("write /srv/www/hello.txt");
    sbx.commands()
        .spawn(Command::shell("exec python3 -m http.server 8000 --bind 127.0.0.1").cwd("/srv/www"))
        .await
        .expect("start the guest's HTTP server")
}
