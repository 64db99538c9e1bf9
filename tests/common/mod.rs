//! Shared set-up of the integration tests: a runtime in a temporary state
//! directory, or a loud skip when KVM or the guest template is missing
//! (never on CI, where that is a failure).

#![allow(dead_code)]

use std::path::Path;

use dormouse::Runtime;

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
