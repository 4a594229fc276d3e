//! `kv shell`: the REPL's commands against a cluster instead of a local
//! data directory.
//!
//! Lines are parsed by the REPL's own parser ([`crate::repl::parse`]); PUT,
//! GET and DEL go to the leader (redirects followed), SIZE asks the leader's
//! status. FLUSH answers OK at once: a cluster acknowledges a write only
//! once it is durable at its acknowledgement level, so there is nothing to
//! flush. SNAP, SETBATCH and BENCH are local-engine commands and say so.
//! A value is printed as its bytes, like the REPL's `GET`.
//!
//! Reading lines is the caller's: [`run`] reads a pipe (or any `BufRead`),
//! [`run_line`] serves the line editor on a terminal (`crate::lineedit`).

use std::io::{BufRead, Write};

use kv_proto::v1 as pb;

use super::cluster_client::{CallError, Client};
use crate::repl::{Command, Flow, HELP, parse};

/// Runs the shell until EXIT or end of input.
pub fn run(
    client: &Client,
    runtime: &tokio::runtime::Runtime,
    input: impl BufRead,
    out: &mut impl Write,
    prompt: bool,
) -> std::io::Result<()> {
    let mut lines = input.split(b'\n');
    loop {
        if prompt {
            out.write_all(b"kv> ")?;
        }
        out.flush()?;
        let Some(line) = lines.next() else {
            return Ok(());
        };
        if run_line(client, runtime, &line?, out)? == Flow::Exit {
            return Ok(());
        }
    }
}

/// Runs one line (a trailing `\r` is dropped) and writes its reply, if
/// any, to `out`.
pub fn run_line(
    client: &Client,
    runtime: &tokio::runtime::Runtime,
    line: &[u8],
    out: &mut impl Write,
) -> std::io::Result<Flow> {
    let mut line = line;
    while let [rest @ .., b'\r'] = line {
        line = rest;
    }
    let reply = match parse(line) {
        Err(msg) => format!("ERR {msg}").into_bytes(),
        Ok(Command::Empty) => return Ok(Flow::Continue),
        Ok(Command::Exit) => return Ok(Flow::Exit),
        Ok(cmd) => runtime.block_on(run_command(client, cmd)),
    };
    out.write_all(&reply)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(Flow::Continue)
}

fn err(e: CallError) -> Vec<u8> {
    format!("ERR {e}").into_bytes()
}

async fn run_command(client: &Client, cmd: Command) -> Vec<u8> {
    match cmd {
        Command::Put { key, value } => {
            let req = pb::PutRequest {
                key,
                value,
                ack: pb::AckLevel::Default as i32,
            };
            match client.put(req).await {
                Ok(_) => "OK".into(),
                Err(e) => err(e),
            }
        }
        Command::Del { key } => {
            let req = pb::DeleteRequest {
                key,
                ack: pb::AckLevel::Default as i32,
            };
            match client.delete(req).await {
                Ok(_) => "OK".into(),
                Err(e) => err(e),
            }
        }
        Command::Get { key } => {
            let req = pb::GetRequest {
                key,
                consistency: pb::ReadConsistency::Default as i32,
            };
            match client.get(req).await {
                Ok(r) if r.found => r.value,
                Ok(_) => "(nil)".into(),
                Err(e) => err(e),
            }
        }
        Command::Size => {
            // Ask a node; if it is not the leader, point at the leader it names.
            let reply = client
                .call(true, |mut c| async move {
                    let s = c.status(pb::StatusRequest {}).await?;
                    if s.get_ref().role == "leader" {
                        return Ok(s);
                    }
                    let mut redirect = tonic::Status::failed_precondition("not leader");
                    if let Ok(v) = s.get_ref().leader_addr.parse() {
                        redirect.metadata_mut().insert(crate::server::LEADER_METADATA, v);
                    }
                    Err(redirect)
                })
                .await;
            match reply {
                Ok(s) => s.keys.to_string().into_bytes(),
                Err(e) => err(e),
            }
        }
        Command::Flush => "OK".into(),
        Command::Help => format!(
            "{HELP}\n(kv shell: FLUSH is implicit, SNAP, SETBATCH and BENCH act on a local engine: use kv repl)"
        )
        .into_bytes(),
        Command::Snap | Command::SetBatch(_) | Command::Bench(_) => {
            b"ERR this command acts on a local engine; use kv repl on a data directory".to_vec()
        }
        Command::Empty | Command::Exit => Vec::new(),
    }
}
