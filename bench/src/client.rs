//! Lean HTTP/1.1 clients: one keep-alive connection per task, Nagle off, as a well-behaved
//! client library would have.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The API key every request carries: a gateway without keys ignores it; the gateways of
/// the limits section (`redis.rs`) know it.
pub const AUTHORIZATION: &str = "Bearer mg-bench-key-0123456789abcdef";

/// Where the same work is sent: through the gateway, or to the mock directly.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Gateway(SocketAddr),
    Direct(SocketAddr),
}

impl Target {
    pub fn addr(self) -> SocketAddr {
        match self {
            Target::Gateway(addr) | Target::Direct(addr) => addr,
        }
    }
}

pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

pub async fn connect_tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Connection> {
        let (sender, connection) = http1::handshake(TokioIo::new(connect_tcp(addr).await?)).await?;
        tokio::spawn(connection);
        Ok(Connection {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends a request and returns the response head; the body is read by the caller.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &Bytes,
    ) -> anyhow::Result<Response<Incoming>> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .header("authorization", AUTHORIZATION)
            .body(Full::new(body.clone()))?;
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }

    /// Sends a request and reads the whole answer, which must be a 200.
    pub async fn call(&mut self, method: &str, path: &str, body: &Bytes) -> anyhow::Result<()> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }
}

/// `POST /invoke` through the gateway, or the InvokeModel call the gateway would make.
pub struct InvokeCall {
    path: &'static str,
    body: Bytes,
}

impl InvokeCall {
    pub fn new(target: Target) -> InvokeCall {
        match target {
            Target::Gateway(_) => InvokeCall {
                path: "/invoke",
                body: Bytes::from(format!(
                    r#"{{"model":"{}","prompt":"What is the capital of France?"}}"#,
                    crate::procs::INVOKE_MODEL
                )),
            },
            Target::Direct(_) => InvokeCall {
                path: "/model/meta.llama3-bench-invoke/invoke",
                body: Bytes::from_static(
                    br#"{"prompt":"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n","max_gen_len":512}"#,
                ),
            },
        }
    }

    pub async fn call(&self, connection: &mut Connection) -> anyhow::Result<()> {
        connection.call("POST", self.path, &self.body).await
    }
}
