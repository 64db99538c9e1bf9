//! Console logging: one `write` per line (the console is a slow, emulated
//! serial port in the guest, so the agent logs only what matters).

use std::fmt;
use std::io::Write;

/// Writes `dormouse-agent: <message>` as one line to standard error (the
/// serial console when the agent is PID 1).
pub fn line(args: fmt::Arguments<'_>) {
    let text = format!("dormouse-agent: {args}\n");
    // Nothing sensible can be done when the console itself fails.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Logs a formatted line to the console.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
pub(crate) use log;
