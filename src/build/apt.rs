//! Extra Debian packages for a template build.
//!
//! The guest has no network, so the host's `apt-get` does the network part
//! against the guest's own package world: the guest's apt sources and its
//! dpkg database (`/var/lib/dpkg/status`, so only what the guest lacks is
//! fetched) and its architecture, in a private apt tree under the build's
//! work directory (the host's own apt state is never touched). Index
//! signatures are checked with the host's apt keys. The `.deb` files are
//! then copied into the guest and installed there with `dpkg -i`, which
//! unpacks them all before configuring any, so their order does not matter.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the packages wait in the guest while `dpkg` installs them.
pub(super) const GUEST_DIR: &str = "/tmp/.dormouse-packages";

/// Prints the guest's one-line apt sources, then a separator line, then its
/// deb822 ones (stanzas kept apart by blank lines), then its architecture.
pub(super) const GUEST_FACTS: &str =
    "cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null; \
     echo '@@dormouse@@'; \
     for f in /etc/apt/sources.list.d/*.sources; do [ -f \"$f\" ] && { cat \"$f\"; echo; }; done; \
     echo '@@dormouse@@'; dpkg --print-architecture";

/// Whether `spec` is a Debian package name, optionally `=version`: what
/// `apt-get install` accepts, and nothing it would take for an option.
pub(super) fn valid_package(spec: &str) -> bool {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let name_ok = name.len() >= 2
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.len() <= 128
            && v.bytes().next().is_some_and(|b| b.is_ascii_digit())
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+~:-".contains(&b))
    });
    name_ok && version_ok
}

/// What the guest said about its package world.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct GuestFacts {
    pub one_line: String,
    pub deb822: String,
    pub arch: String,
}

/// Parses the output of [`GUEST_FACTS`].
pub(super) fn parse_facts(out: &str) -> Result<GuestFacts, String> {
    let mut parts = out.split("@@dormouse@@\n");
    let (Some(one_line), Some(deb822), Some(arch), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("unexpected answer from the guest: {out:?}"));
    };
    let arch = arch.trim();
    if arch.is_empty() || !arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(format!("the guest's dpkg architecture is {arch:?}"));
    }
    let has_source = one_line.lines().any(|l| l.trim_start().starts_with("deb "))
        || deb822.lines().any(|l| l.trim_start().starts_with("URIs:"));
    if !has_source {
        return Err(
            "the template has no apt source (/etc/apt/sources.list or sources.list.d) to take packages from"
                .into(),
        );
    }
    Ok(GuestFacts {
        one_line: one_line.to_owned(),
        deb822: deb822.to_owned(),
        arch: arch.to_owned(),
    })
}

/// Downloads `packages` and the dependencies the guest lacks into
/// `work/archives`, in a private apt tree under `work` (made here; the
/// caller removes it). Returns the `.deb` files, sorted: none when the
/// guest has them all. The error is apt's own message.
pub(super) fn download(
    work: &Path,
    facts: &GuestFacts,
    dpkg_status: &[u8],
    packages: &[String],
) -> Result<Vec<PathBuf>, String> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    for dir in [
        "sources.list.d",
        "preferences.d",
        "state/lists/partial",
        "archives/partial",
    ] {
        std::fs::create_dir_all(work.join(dir)).map_err(io("cannot make the apt tree"))?;
    }
    std::fs::write(work.join("sources.list"), &facts.one_line)
        .and_then(|()| {
            std::fs::write(
                work.join("sources.list.d").join("guest.sources"),
                &facts.deb822,
            )
        })
        .and_then(|()| std::fs::write(work.join("status"), dpkg_status))
        .map_err(io("cannot write the apt tree"))?;

    let w = work.display();
    let mut options = vec![
        format!("Dir::Etc::SourceList={w}/sources.list"),
        format!("Dir::Etc::SourceParts={w}/sources.list.d"),
        format!("Dir::Etc::Preferences={w}/preferences"),
        format!("Dir::Etc::PreferencesParts={w}/preferences.d"),
        format!("Dir::State={w}/state"),
        format!("Dir::State::status={w}/status"),
        format!("Dir::Cache={w}/cache"),
        format!("Dir::Cache::archives={w}/archives"),
        format!("APT::Architecture={}", facts.arch),
        format!("APT::Architectures={}", facts.arch),
        "APT::Install-Recommends=false".into(),
        "APT::Get::Assume-Yes=true".into(),
        "Acquire::Languages=none".into(),
        "Acquire::Retries=3".into(),
        "Acquire::http::Timeout=60".into(),
        "Debug::NoLocking=true".into(),
    ];
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // apt would download as `_apt`, who cannot write this tree.
        options.push("APT::Sandbox::User=root".into());
    }
    let apt = |args: &[&str]| -> Result<(), String> {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-q");
        for o in &options {
            cmd.arg("-o").arg(o);
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let out = cmd.output().map_err(|e| {
            format!(
                "cannot run apt-get on the host ({e}): extra Debian packages are downloaded \
                 by the host's apt-get (the guest has no network); install apt or leave \
                 the packages out"
            )
        })?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "apt-get {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        ))
    };
    apt(&["update"])?;
    let mut install = vec!["install", "--download-only"];
    install.extend(packages.iter().map(String::as_str));
    apt(&install)?;

    let mut debs: Vec<PathBuf> = std::fs::read_dir(work.join("archives"))
        .map_err(io("cannot list the downloaded packages"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    if let Some(odd) = debs.iter().find(|p| {
        !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+~%-".contains(&b))
        })
    }) {
        return Err(format!(
            "apt-get downloaded an oddly named file: {}",
            odd.display()
        ));
    }
    debs.sort();
    Ok(debs)
}

/// The last lines of a command's output, for an error message.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(15)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// The guest command that installs the copied packages and removes them.
pub(super) fn install_command(debs: &[PathBuf]) -> String {
    // No fsync per file: the snapshot taken after the build captures the
    // guest's page cache and disk together.
    let mut cmd =
        String::from("DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold --force-unsafe-io");
    for deb in debs {
        if let Some(name) = deb.file_name() {
            cmd.push_str(&format!(" '{GUEST_DIR}/{}'", name.to_string_lossy()));
        }
    }
    cmd.push_str(&format!("; rc=$?; rm -rf {GUEST_DIR}; exit $rc"));
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_checked() {
        for ok in [
            "jq",
            "libc6",
            "g++",
            "python3.11",
            "sqlite3=3.40.1-2+deb12u1",
            "x11-utils",
        ] {
            assert!(valid_package(ok), "{ok}");
        }
        for bad in [
            "",
            "j",
            "-o",
            "--allow-unauthenticated",
            "Jq",
            "jq=",
            "jq=latest",
            "a b",
            "jq;ls",
            "jq'",
            "../x",
            "jq=1 2",
        ] {
            assert!(!valid_package(bad), "{bad}");
        }
    }

    #[test]
    fn guest_facts_are_parsed_and_checked() {
        let facts = parse_facts(
            "deb http://deb.debian.org/debian bookworm main\n@@dormouse@@\n@@dormouse@@\namd64\n",
        )
        .unwrap();
        assert_eq!(facts.arch, "amd64");
        assert!(facts.one_line.contains("bookworm"));
        let deb822 = "@@dormouse@@\nTypes: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\n\n@@dormouse@@\narm64\n";
        assert_eq!(parse_facts(deb822).unwrap().arch, "arm64");
        assert!(parse_facts("@@dormouse@@\n@@dormouse@@\namd64\n")
            .unwrap_err()
            .contains("no apt source"));
        assert!(parse_facts("deb x y\n@@dormouse@@\n@@dormouse@@\n\n").is_err());
        assert!(parse_facts("deb x y\n@@dormouse@@\n@@dormouse@@\namd64; rm\n").is_err());
        assert!(parse_facts("garbage").is_err());
    }

    #[test]
    fn the_install_command_names_every_package() {
        let cmd = install_command(&[PathBuf::from("/w/archives/jq_1.6-2.1_amd64.deb")]);
        assert!(cmd.contains("dpkg -i"));
        assert!(cmd.contains("'/tmp/.dormouse-packages/jq_1.6-2.1_amd64.deb'"));
        assert!(cmd.ends_with("exit $rc"));
    }
}
