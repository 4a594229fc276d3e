//! The single-node REPL: parse a line, run it against the engine, print one
//! reply.
//!
//! Commands are case-insensitive: `PUT key value` (the value is the rest of
//! the line), `GET key`, `DEL key`, `SIZE`, `SNAP`, `FLUSH`, `SETBATCH n`,
//! `BENCH n`, `HELP`, `EXIT`. Replies are `OK`, a value or `(nil)`, a count,
//! the `BENCH` line, or `ERR <message>`, after which the REPL goes on. Lines
//! are bytes: keys and values need not be UTF-8 (only `\n` ends a line).
//!
//! Parsing ([`parse`]) is pure and separate from running ([`Repl::run_line`]),
//! so both are tested on their own. [`Repl::run`] reads from any `BufRead`
//! (a pipe) and does no line editing of its own; on a terminal, `kv repl`
//! feeds [`Repl::run_line`] from the line editor (`crate::lineedit`) and
//! ends with [`Repl::finish`].

use std::io::{BufRead, Read, Write};
use std::sync::Arc;

use crate::bench;
use crate::engine::Engine;

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
    Del {
        key: Vec<u8>,
    },
    Size,
    Snap,
    Flush,
    SetBatch(u32),
    Bench(u64),
    Help,
    Exit,
    /// A blank line: no reply.
    Empty,
}

/// The text `HELP` prints.
pub const HELP: &str = "\
commands (case-insensitive):
  PUT key value   set key to value (the value is the rest of the line)
  GET key         print the value, or (nil)
  DEL key         remove key
  SIZE            number of keys
  SNAP            write a snapshot and drop the WAL it covers
  FLUSH           return once every earlier write is durable
  SETBATCH n      sync every n writes (1 = before every OK; n > 1 can lose
                  up to n-1 acknowledged writes, or one flush interval, on
                  power loss)
  BENCH n         n sequential PUTs then FLUSH, under the current SETBATCH
  HELP            this text
  EXIT            flush and quit";

fn is_space(b: &u8) -> bool {
    *b == b' ' || *b == b'\t'
}

/// Splits off the first whitespace-separated token; returns it and the rest
/// with leading whitespace removed.
fn token(line: &[u8]) -> (&[u8], &[u8]) {
    let start = line.iter().position(|b| !is_space(b)).unwrap_or(line.len());
    let line = &line[start..];
    let end = line.iter().position(is_space).unwrap_or(line.len());
    let rest = &line[end..];
    let rest_start = rest.iter().position(|b| !is_space(b)).unwrap_or(rest.len());
    (&line[..end], &rest[rest_start..])
}

fn no_more(cmd: &str, rest: &[u8], ok: Command) -> Result<Command, String> {
    if rest.is_empty() {
        Ok(ok)
    } else {
        Err(format!("{cmd} takes no arguments"))
    }
}

fn number<T: std::str::FromStr>(cmd: &str, rest: &[u8]) -> Result<T, String> {
    let (arg, extra) = token(rest);
    if arg.is_empty() || !extra.is_empty() {
        return Err(format!("usage: {cmd} n"));
    }
    std::str::from_utf8(arg)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "{cmd}: '{}' is not a valid number",
                String::from_utf8_lossy(arg)
            )
        })
}

/// Parses one line (without its line ending).
pub fn parse(line: &[u8]) -> Result<Command, String> {
    let (word, rest) = token(line);
    if word.is_empty() {
        return Ok(Command::Empty);
    }
    let name = String::from_utf8_lossy(word).to_ascii_uppercase();
    match name.as_str() {
        "PUT" => {
            let (key, value) = token(rest);
            if key.is_empty() || value.is_empty() {
                return Err("usage: PUT key value".into());
            }
            Ok(Command::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            })
        }
        "GET" | "DEL" => {
            let (key, extra) = token(rest);
            if key.is_empty() || !extra.is_empty() {
                return Err(format!("usage: {name} key"));
            }
            let key = key.to_vec();
            Ok(if name == "GET" {
                Command::Get { key }
            } else {
                Command::Del { key }
            })
        }
        "SIZE" => no_more("SIZE", rest, Command::Size),
        "SNAP" => no_more("SNAP", rest, Command::Snap),
        "FLUSH" => no_more("FLUSH", rest, Command::Flush),
        "HELP" => no_more("HELP", rest, Command::Help),
        "EXIT" | "QUIT" => no_more("EXIT", rest, Command::Exit),
        "SETBATCH" => {
            let n: u32 = number("SETBATCH", rest)?;
            if n == 0 {
                return Err("SETBATCH: n must be at least 1".into());
            }
            Ok(Command::SetBatch(n))
        }
        "BENCH" => {
            let n: u64 = number("BENCH", rest)?;
            if n == 0 {
                return Err("BENCH: n must be at least 1".into());
            }
            Ok(Command::Bench(n))
        }
        _ => Err(format!("unknown command '{name}' (try HELP)")),
    }
}

/// What the REPL should do after a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Exit,
}

/// A REPL bound to an engine.
#[derive(Debug)]
pub struct Repl {
    engine: Arc<Engine>,
    /// Longest line read: room for the longest key and value and the command.
    line_bytes_max: u64,
}

/// Discards input up to and including the next newline.
fn skip_line(input: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let len = buf.len();
                input.consume(len);
            }
        }
    }
}

impl Repl {
    /// A REPL over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        let c = engine.config();
        let line_bytes_max = (c.key_bytes_max + c.value_bytes_max + 64) as u64;
        Repl {
            engine,
            line_bytes_max,
        }
    }

    /// Runs one line and writes its reply (if any) to `out`.
    pub fn run_line(&self, line: &[u8], out: &mut impl Write) -> std::io::Result<Flow> {
        let cmd = match parse(line) {
            Ok(cmd) => cmd,
            Err(msg) => {
                writeln!(out, "ERR {msg}")?;
                return Ok(Flow::Continue);
            }
        };
        let engine = &self.engine;
        let reply: Result<Vec<u8>, String> = match cmd {
            Command::Empty => return Ok(Flow::Continue),
            Command::Exit => {
                if let Err(e) = engine.flush() {
                    writeln!(out, "ERR {e}")?;
                }
                return Ok(Flow::Exit);
            }
            Command::Put { key, value } => engine
                .put(key, value)
                .map(|_| b"OK".to_vec())
                .map_err(|e| e.to_string()),
            Command::Del { key } => engine
                .delete(key)
                .map(|_| b"OK".to_vec())
                .map_err(|e| e.to_string()),
            Command::Get { key } => match engine.validate(&key, None) {
                Ok(()) => Ok(engine.get(&key).unwrap_or_else(|| b"(nil)".to_vec())),
                Err(e) => Err(e.to_string()),
            },
            Command::Size => Ok(engine.len().to_string().into_bytes()),
            Command::Flush => engine
                .flush()
                .map(|()| b"OK".to_vec())
                .map_err(|e| e.to_string()),
            Command::SetBatch(n) => engine
                .set_batch(n)
                .map(|()| b"OK".to_vec())
                .map_err(|e| e.to_string()),
            Command::Snap => engine
                .snapshot()
                .map(|s| {
                    format!(
                        "OK snapshot at LSN {} ({} keys, {} bytes, {} WAL segments removed)",
                        s.lsn, s.keys, s.bytes, s.segments_removed
                    )
                    .into_bytes()
                })
                .map_err(|e| e.to_string()),
            Command::Bench(n) => bench::repl_bench(engine, n)
                .map(|r| r.to_string().into_bytes())
                .map_err(|e| e.to_string()),
            Command::Help => Ok(HELP.as_bytes().to_vec()),
        };
        match reply {
            Ok(bytes) => {
                out.write_all(&bytes)?;
                out.write_all(b"\n")?;
            }
            Err(msg) => writeln!(out, "ERR {msg}")?,
        }
        Ok(Flow::Continue)
    }

    /// End of input: flushes (makes every write durable), saying `ERR` if
    /// that failed.
    pub fn finish(&self, out: &mut impl Write) -> std::io::Result<()> {
        if let Err(e) = self.engine.flush() {
            writeln!(out, "ERR {e}")?;
        }
        out.flush()
    }

    /// Reads lines from `input` until `EXIT` or end of input, replying to
    /// each on `out`. With `prompt`, prints `kv> ` before each line. At the
    /// end, everything written is flushed (made durable).
    pub fn run(
        &self,
        mut input: impl BufRead,
        out: &mut impl Write,
        prompt: bool,
    ) -> std::io::Result<()> {
        let mut line = Vec::new();
        loop {
            if prompt {
                out.write_all(b"kv> ")?;
            }
            out.flush()?;
            line.clear();
            // Bounded read: a line longer than any valid command is refused
            // without being held in memory whole.
            let n = (&mut input)
                .take(self.line_bytes_max + 1)
                .read_until(b'\n', &mut line)?;
            if n as u64 > self.line_bytes_max && line.last() != Some(&b'\n') {
                skip_line(&mut input)?;
                writeln!(
                    out,
                    "ERR line longer than {} bytes; ignored",
                    self.line_bytes_max
                )?;
                continue;
            }
            if n == 0 {
                return self.finish(out);
            }
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            if self.run_line(&line, out)? == Flow::Exit {
                out.flush()?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expected: Result<Command, &str>) {
        let got = parse(line.as_bytes());
        match expected {
            Ok(cmd) => assert_eq!(got, Ok(cmd), "line {line:?}"),
            Err(fragment) => {
                let err = got.expect_err(line);
                assert!(
                    err.contains(fragment),
                    "line {line:?}: error {err:?} lacks {fragment:?}"
                );
            }
        }
    }

    #[test]
    fn parses_commands() {
        let put = |k: &str, v: &str| Command::Put {
            key: k.into(),
            value: v.into(),
        };
        check("PUT k v", Ok(put("k", "v")));
        check("put k hello world  ", Ok(put("k", "hello world  ")));
        check("  Put   k   spaced value", Ok(put("k", "spaced value")));
        check("GET k", Ok(Command::Get { key: b"k".to_vec() }));
        check("del k", Ok(Command::Del { key: b"k".to_vec() }));
        check("SIZE", Ok(Command::Size));
        check("snap", Ok(Command::Snap));
        check("FLUSH", Ok(Command::Flush));
        check("SETBATCH 5", Ok(Command::SetBatch(5)));
        check("bench 10000", Ok(Command::Bench(10000)));
        check("HELP", Ok(Command::Help));
        check("exit", Ok(Command::Exit));
        check("   ", Ok(Command::Empty));
    }

    #[test]
    fn rejects_malformed_commands() {
        check("PUT k", Err("usage: PUT key value"));
        check("PUT", Err("usage: PUT key value"));
        check("GET", Err("usage: GET key"));
        check("GET a b", Err("usage: GET key"));
        check("DEL", Err("usage: DEL key"));
        check("SIZE now", Err("takes no arguments"));
        check("SETBATCH", Err("usage: SETBATCH n"));
        check("SETBATCH 0", Err("at least 1"));
        check("SETBATCH -1", Err("not a valid number"));
        check("SETBATCH 99999999999", Err("not a valid number"));
        check("BENCH x", Err("not a valid number"));
        check("FROB k", Err("unknown command 'FROB'"));
    }
}
