//! `fasternet-serve healthcheck`: exit 0 when a URL answers 200. For container HEALTHCHECKs,
//! which then need no curl or wget in the image.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    /// An http:// URL (no TLS); default: this machine's /readyz on --port.
    #[arg(long, env = "FASTERNET_HEALTHCHECK_URL")]
    url: Option<String>,
    /// The server's port (the same FASTERNET_PORT the server reads).
    #[arg(long, env = "FASTERNET_PORT", default_value_t = 8080)]
    port: u16,
    #[arg(long, env = "FASTERNET_HEALTHCHECK_TIMEOUT_MS", default_value_t = 3000)]
    timeout_ms: u64,
}

pub fn run(args: HealthcheckArgs) -> anyhow::Result<i32> {
    let url = args.url.unwrap_or_else(|| format!("http://127.0.0.1:{}/readyz", args.port));
    let rest = url.strip_prefix("http://").context("only http:// URLs are supported")?;
    let (authority, path) =
        rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let timeout = Duration::from_millis(args.timeout_ms);
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .context("no address")?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(0),
        Some(code) => {
            eprintln!("{url}: HTTP {code}");
            Ok(1)
        }
        None => bail!("{url}: not an HTTP response"),
    }
}
