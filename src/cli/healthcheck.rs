//! `fasternet-serve healthcheck`: exit 0 when a URL answers 200. For container HEALTHCHECKs,
//! which then need no curl or wget in the image.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    /// An http:// URL (no TLS).
    #[arg(long, env = "FASTERNET_HEALTHCHECK_URL", default_value = "http://127.0.0.1:8080/readyz")]
    url: String,
    #[arg(long, env = "FASTERNET_HEALTHCHECK_TIMEOUT_MS", default_value_t = 3000)]
    timeout_ms: u64,
}

pub fn run(args: HealthcheckArgs) -> anyhow::Result<i32> {
    let rest = args.url.strip_prefix("http://").context("only http:// URLs are supported")?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
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
            eprintln!("{}: HTTP {code}", args.url);
            Ok(1)
        }
        None => bail!("{}: not an HTTP response", args.url),
    }
}
