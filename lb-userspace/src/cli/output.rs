//! The command's standard output, buffered until the command is done with the pin directory:
//! a reader whose output goes to a pager or a full pipe then holds no lock while it waits, so
//! writers and the agent never wait on it. A reader of a closed pipe (`lb flows | head`) ends
//! quietly.

use std::{
    io::{ErrorKind, Write},
    sync::Mutex,
};

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Appends to the output (`out!`, `outln!`).
pub fn write(args: std::fmt::Arguments) {
    let mut b = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
    // Writing into a Vec cannot fail.
    let _ = b.write_fmt(args);
}

/// Writes what was buffered to standard output. Err: it could not be written (the reader is
/// gone: a closed pipe).
pub fn flush() -> std::io::Result<()> {
    let data = std::mem::take(&mut *BUFFER.lock().unwrap_or_else(|p| p.into_inner()));
    let mut out = std::io::stdout().lock();
    out.write_all(&data)?;
    out.flush()
}

/// `flush`; a closed pipe is no error (as `head` expects of its writer: the rest of the output
/// is dropped, the command's own result still decides the exit code), any other failure ends
/// the process with a message.
/// Returns false when the reader is gone.
pub fn flush_or_exit() -> bool {
    match flush() {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::BrokenPipe => false,
        Err(e) => {
            eprintln!("lb: error: writing the output: {e}");
            std::process::exit(1);
        }
    }
}
