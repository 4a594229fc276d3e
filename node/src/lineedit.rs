//! Line editing and history for `kv repl` and `kv shell` when standard
//! input is a terminal (`rustyline`: cursor keys, Emacs bindings, history
//! search). Ctrl-C drops the line being typed; Ctrl-D (end of input) ends
//! the session as EXIT does.
//!
//! It does not parse or run commands (the caller's `on_line` does), and it
//! is never used on a pipe: there both commands read their input as bytes,
//! exactly as they always did. Lines typed on a terminal are UTF-8.
//!
//! History is kept in `$KV_HISTORY`, else `$HOME/.kv_history`; a history
//! file that cannot be read or written only costs the history.

use std::path::PathBuf;

use rustyline::error::ReadlineError;

use crate::repl::Flow;

/// Where the history is kept, if anywhere.
pub fn history_path() -> Option<PathBuf> {
    std::env::var_os("KV_HISTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kv_history")))
}

/// What went wrong with the terminal.
#[derive(Debug, thiserror::Error)]
pub enum LineEditError {
    /// The editor could not be set up or read the terminal.
    #[error("line editor: {0}")]
    Editor(#[from] ReadlineError),
    /// Running a line failed (writing its reply).
    #[error("writing a reply: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads lines with `prompt` until `on_line` says [`Flow::Exit`] or input
/// ends, passing each line (without its newline) to `on_line`.
pub fn run(
    prompt: &str,
    mut on_line: impl FnMut(&[u8]) -> std::io::Result<Flow>,
) -> Result<(), LineEditError> {
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = history_path();
    if let Some(path) = &history
        && let Err(e) = editor.load_history(path)
    {
        tracing::debug!(path = %path.display(), error = %e, "no history loaded");
    }
    let result = loop {
        match editor.readline(prompt) {
            Ok(line) => {
                if !line.trim().is_empty()
                    && let Err(e) = editor.add_history_entry(line.as_str())
                {
                    tracing::debug!(error = %e, "history entry not kept");
                }
                match on_line(line.as_bytes()) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Exit) => break Ok(()),
                    Err(e) => break Err(e.into()),
                }
            }
            Err(ReadlineError::Interrupted) => {}
            Err(ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    if let Some(path) = &history
        && let Err(e) = editor.save_history(path)
    {
        tracing::debug!(path = %path.display(), error = %e, "history not saved");
    }
    result
}
