//! Idle client connections: what each costs the gateway, and how many it holds at its cap
//! when twice as many clients connect and then say nothing.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use futures_util::{StreamExt, stream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::procs::Process;

pub struct IdleConnections {
    /// Connections that made one request and then sat idle, all held.
    pub opened: usize,
    pub rss_baseline: u64,
    pub rss_held: u64,
    /// Of twice `max_connections` idle connections, how many the gateway still holds.
    pub held_at_cap: usize,
}

/// Opens `cap` kept-alive connections (one `/healthz` each, then nothing) against a gateway
/// whose `max_connections` is `cap`, reads its memory, then `cap` more, and counts how many
/// of all of them the gateway keeps.
pub async fn idle(gateway: &Process, cap: usize) -> anyhow::Result<IdleConnections> {
    let addr = gateway.addr;
    drop(open(addr, 100).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_baseline = gateway.rss_bytes();
    let mut first = open(addr, cap).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_held = gateway.rss_bytes();
    let opened = count_open(&mut first).await;
    let mut second = open(addr, cap).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held_at_cap = count_open(&mut first).await + count_open(&mut second).await;
    Ok(IdleConnections {
        opened,
        rss_baseline,
        rss_held,
        held_at_cap,
    })
}

async fn open(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    stream::iter(0..n)
        .map(|_| async move {
            let mut socket = TcpStream::connect(addr).await.context("connecting")?;
            socket
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                .await?;
            let mut answer = [0u8; 512];
            let read = socket.read(&mut answer).await?;
            anyhow::ensure!(
                answer[..read].starts_with(b"HTTP/1.1 200"),
                "/healthz did not answer 200"
            );
            anyhow::Ok(socket)
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// How many of `sockets` the gateway has not closed.
async fn count_open(sockets: &mut [TcpStream]) -> usize {
    let mut open = 0;
    let mut byte = [0u8; 1];
    for socket in sockets {
        if let Err(err) = socket.try_read(&mut byte)
            && err.kind() == std::io::ErrorKind::WouldBlock
        {
            open += 1;
        }
    }
    open
}
