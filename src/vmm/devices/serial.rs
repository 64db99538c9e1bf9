//! The serial console (COM1, a 16550A from vm-superio). Guest output goes to
//! a log file line by line; the last lines are kept in memory for error
//! reports, and a kernel panic on the console is detected.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// How many console lines are kept in memory.
pub const CONSOLE_TAIL_LINES: usize = 40;
/// The longest line kept; longer lines are split.
const MAX_LINE: usize = 4096;
const PANIC_MARKER: &str = "Kernel panic - not syncing";

#[derive(Debug, Default)]
struct ConsoleState {
    file: Option<File>,
    line: Vec<u8>,
    tail: VecDeque<String>,
    panic: Option<String>,
}

/// A cloneable handle on the console log.
#[derive(Debug, Clone, Default)]
pub struct Console {
    state: Arc<Mutex<ConsoleState>>,
}

impl Console {
    /// A console that writes to `path` (created or truncated).
    pub fn to_file(path: &Path) -> io::Result<Console> {
        Self::with_file(File::create(path)?)
    }

    /// A console that appends to `path` (created if missing), e.g. after a
    /// restore.
    pub fn append_to_file(path: &Path) -> io::Result<Console> {
        Self::with_file(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )
    }

    fn with_file(file: File) -> io::Result<Console> {
        Ok(Console {
            state: Arc::new(Mutex::new(ConsoleState {
                file: Some(file),
                ..Default::default()
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last lines the guest printed (the partial current line included).
    pub fn tail(&self) -> Vec<String> {
        let state = self.lock();
        let mut lines: Vec<String> = state.tail.iter().cloned().collect();
        if !state.line.is_empty() {
            lines.push(String::from_utf8_lossy(&state.line).into_owned());
        }
        lines
    }

    /// The panic line, if the guest kernel panicked.
    pub fn panic_message(&self) -> Option<String> {
        self.lock().panic.clone()
    }

    /// Appends guest output.
    pub fn push(&self, bytes: &[u8]) {
        let mut state = self.lock();
        for &b in bytes {
            if b == b'\n' || state.line.len() >= MAX_LINE {
                let raw = std::mem::take(&mut state.line);
                let text = String::from_utf8_lossy(&raw)
                    .trim_end_matches('\r')
                    .to_owned();
                if let Some(file) = state.file.as_mut() {
                    // The log is best effort: a full disk must not stop the guest.
                    let _ = file.write_all(text.as_bytes());
                    let _ = file.write_all(b"\n");
                }
                if state.panic.is_none() && text.contains(PANIC_MARKER) {
                    state.panic = Some(text.clone());
                }
                if state.tail.len() == CONSOLE_TAIL_LINES {
                    state.tail.pop_front();
                }
                state.tail.push_back(text);
                if b != b'\n' {
                    state.line.push(b);
                }
            } else {
                state.line.push(b);
            }
        }
    }
}

/// The serial output sink: forwards to the console log.
#[derive(Debug)]
pub struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The serial interrupt: an irqfd bound to COM1's GSI.
#[derive(Debug)]
pub struct IrqEvt(pub EventFd);

impl Trigger for IrqEvt {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as the guest sees it.
pub type SerialDevice = Serial<IrqEvt, NoEvents, ConsoleWriter>;

/// Creates COM1 writing to `console`, interrupting through `irq`.
pub fn new_serial(console: Console, irq: EventFd) -> SerialDevice {
    Serial::new(IrqEvt(irq), ConsoleWriter(console))
}

/// The registers of COM1 (`vm_superio::SerialState`, which has no serde
/// support).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Saves COM1's registers.
pub fn save_serial(serial: &SerialDevice) -> SerialSnapshot {
    let s = serial.state();
    SerialSnapshot {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer,
    }
}

/// COM1 in a saved state, writing to `console`, interrupting through `irq`.
pub fn restore_serial(
    snapshot: &SerialSnapshot,
    console: Console,
    irq: EventFd,
) -> Result<SerialDevice, String> {
    let state = vm_superio::serial::SerialState {
        baud_divisor_low: snapshot.baud_divisor_low,
        baud_divisor_high: snapshot.baud_divisor_high,
        interrupt_enable: snapshot.interrupt_enable,
        interrupt_identification: snapshot.interrupt_identification,
        line_control: snapshot.line_control,
        line_status: snapshot.line_status,
        modem_control: snapshot.modem_control,
        modem_status: snapshot.modem_status,
        scratch: snapshot.scratch,
        in_buffer: snapshot.in_buffer.clone(),
    };
    Serial::from_state(&state, IrqEvt(irq), NoEvents, ConsoleWriter(console))
        .map_err(|e| format!("invalid saved serial port state: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_tail_and_detects_panic() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::to_file(&dir.path().join("console.log")).unwrap();
        for i in 0..100 {
            console.push(format!("line {i}\r\n").as_bytes());
        }
        console.push(b"partial");
        let tail = console.tail();
        assert_eq!(tail.len(), CONSOLE_TAIL_LINES + 1);
        assert_eq!(tail[0], format!("line {}", 100 - CONSOLE_TAIL_LINES));
        assert_eq!(tail.last().unwrap(), "partial");
        assert!(console.panic_message().is_none());
        console.push(b"\n[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n");
        assert!(console
            .panic_message()
            .unwrap()
            .contains("Unable to mount root"));
        let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
        assert!(log.starts_with("line 0\nline 1\n"));
    }
}
