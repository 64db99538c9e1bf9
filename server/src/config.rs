//! The command line and where the API keys come from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: dormouse-server --state-dir DIR [options]

  --listen ADDR           address to serve on (default 127.0.0.1:3000)
  --state-dir DIR         where sandboxes, snapshots and templates live
  --template-dir DIR      where base templates are (default: DORMOUSE_TEMPLATE_PATH
                          or ~/.cache/dormouse/templates)
  --keys-file FILE        API keys, one per line ('#' comments); added to those
                          in DORMOUSE_API_KEYS (comma-separated)
  --domain DOMAIN         domain reported to clients, for {port}-{id}.{domain}
                          hosts (default localhost:<port>)
  --alias NAME=TEMPLATE   serve E2B template NAME with dormouse TEMPLATE
                          (default: base and code-interpreter-v1 = python)
  --prepare TEMPLATE      boot TEMPLATE's snapshot before answering /health
                          (repeatable; default python)
  --on-shutdown pause|kill  what SIGTERM does to running sandboxes (default pause)
  -h, --help              this text
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    Pause,
    Kill,
}

#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub template_dir: Option<PathBuf>,
    pub keys: Vec<String>,
    pub domain: Option<String>,
    pub aliases: HashMap<String, String>,
    pub prepare: Vec<String>,
    pub on_shutdown: OnShutdown,
}

/// The shortest key accepted: shorter ones are guessable.
const MIN_KEY_LEN: usize = 16;

impl Config {
    /// `Ok(None)` for `--help`.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Option<Config>, String> {
        Self::parse(args, std::env::var("DORMOUSE_API_KEYS").ok())
    }

    fn parse(
        args: impl IntoIterator<Item = String>,
        env_keys: Option<String>,
    ) -> Result<Option<Config>, String> {
        let mut listen: SocketAddr = ([127, 0, 0, 1], 3000).into();
        let mut state_dir = None;
        let mut template_dir = None;
        let mut keys_file = None;
        let mut domain = None;
        let mut aliases = HashMap::new();
        let mut prepare = Vec::new();
        let mut on_shutdown = OnShutdown::Pause;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            if flag == "-h" || flag == "--help" {
                return Ok(None);
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--listen" => {
                    let v = value()?;
                    listen = v.parse().map_err(|_| {
                        format!("--listen {v:?}: give an address like 127.0.0.1:3000")
                    })?;
                }
                "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
                "--template-dir" => template_dir = Some(PathBuf::from(value()?)),
                "--keys-file" => keys_file = Some(PathBuf::from(value()?)),
                "--domain" => domain = Some(value()?),
                "--alias" => {
                    let v = value()?;
                    let (name, template) = v
                        .split_once('=')
                        .filter(|(n, t)| !n.is_empty() && !t.is_empty())
                        .ok_or_else(|| format!("--alias {v:?}: give NAME=TEMPLATE"))?;
                    aliases.insert(name.to_owned(), template.to_owned());
                }
                "--prepare" => prepare.push(value()?),
                "--on-shutdown" => {
                    on_shutdown = match value()?.as_str() {
                        "pause" => OnShutdown::Pause,
                        "kill" => OnShutdown::Kill,
                        other => {
                            return Err(format!("--on-shutdown {other:?}: give pause or kill"))
                        }
                    }
                }
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        let state_dir = state_dir.ok_or("--state-dir is required")?;
        let mut keys: Vec<String> = env_keys
            .iter()
            .flat_map(|k| k.split(','))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(path) = &keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the keys file {}: {e}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        if keys.is_empty() {
            return Err(
                "no API keys: set DORMOUSE_API_KEYS (comma-separated) or give --keys-file".into(),
            );
        }
        if let Some(short) = keys.iter().find(|k| k.len() < MIN_KEY_LEN) {
            return Err(format!(
                "an API key of {} characters is too short: use at least {MIN_KEY_LEN}",
                short.len()
            ));
        }
        if aliases.is_empty() {
            for name in ["base", "code-interpreter-v1"] {
                aliases.insert(name.to_owned(), "python".to_owned());
            }
        }
        if prepare.is_empty() {
            prepare.push("python".to_owned());
        }
        Ok(Some(Config {
            listen,
            state_dir,
            template_dir,
            keys,
            domain,
            aliases,
            prepare,
            on_shutdown,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], keys: Option<&str>) -> Result<Option<Config>, String> {
        Config::parse(args.iter().map(|s| s.to_string()), keys.map(str::to_owned))
    }

    #[test]
    fn parses_flags_keys_and_defaults() {
        let c = parse(
            &[
                "--listen",
                "127.0.0.1:4000",
                "--state-dir=/s",
                "--alias",
                "x=y",
            ],
            Some("e2b_0123456789abcdef, e2b_fedcba9876543210 ,"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.listen.port(), 4000);
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.keys.len(), 2);
        assert_eq!(c.aliases.get("x").map(String::as_str), Some("y"));
        assert_eq!(c.prepare, ["python"]);
        assert_eq!(c.on_shutdown, OnShutdown::Pause);
        assert!(parse(&["--help"], None).unwrap().is_none());
    }

    #[test]
    fn refuses_what_cannot_work() {
        for (args, keys) in [
            (&["--state-dir", "/s"][..], None),
            (&["--state-dir", "/s"][..], Some("short")),
            (&[][..], Some("e2b_0123456789abcdef")),
            (
                &["--state-dir", "/s", "--listen", "nowhere"][..],
                Some("e2b_0123456789abcdef"),
            ),
            (
                &["--state-dir", "/s", "--on-shutdown", "nap"][..],
                Some("e2b_0123456789abcdef"),
            ),
            (
                &["--state-dir", "/s", "--bogus"][..],
                Some("e2b_0123456789abcdef"),
            ),
            (&["--state-dir"][..], Some("e2b_0123456789abcdef")),
        ] {
            assert!(parse(args, keys).is_err(), "{args:?}");
        }
    }
}
