//! A fault-injecting TCP proxy, put between the programs and PostgreSQL, RabbitMQ or Redis.
//!
//! It forwards bytes both ways and, on command: cuts every open connection, refuses new
//! ones (the dependency is "down"), stalls all traffic (the dependency hangs), stalls only
//! the connections open now while new ones pass (half-open connections: the peer is gone
//! without a word, the dependency itself is fine), or cuts each connection after a number
//! of bytes (a connection dropped mid-frame). It can also be repointed at another upstream,
//! like a VIP or HAProxy after a failover: connections opened later go to the new upstream,
//! open ones stay where they are unless cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::AbortHandle;

/// A running proxy.
pub struct FaultProxy {
    /// Where clients connect (`127.0.0.1:PORT`).
    pub addr: String,
    state: Arc<State>,
    accept: AbortHandle,
}

struct State {
    upstream: std::sync::RwLock<String>,
    down: AtomicBool,
    stall: watch::Sender<bool>,
    /// Bytes each connection open at the last `cut_after_bytes` may still forward.
    cut_after: AtomicU64,
    /// Bumped by each `cut_after_bytes`; connections compare it with what they saw.
    cut_gen: AtomicU64,
    /// Numbers the connections in the order they open.
    opened: AtomicU64,
    /// Connections numbered below this are stalled for good (`stall_existing`).
    stall_below: AtomicU64,
    conns: Mutex<Vec<AbortHandle>>,
}

impl FaultProxy {
    /// Listens on a free port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (stall, _) = watch::channel(false);
        let state = Arc::new(State {
            upstream: std::sync::RwLock::new(upstream.to_owned()),
            down: AtomicBool::new(false),
            stall,
            cut_after: AtomicU64::new(0),
            cut_gen: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            stall_below: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let st2 = st.clone();
                let upstream = st.upstream.read().map(|u| u.clone()).unwrap_or_default();
                let handle = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        pipe(client, server, st2).await;
                    }
                });
                st.conns.lock().await.push(handle.abort_handle());
            }
        })
        .abort_handle();
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    /// Closes every open connection at once.
    pub async fn cut(&self) {
        for c in self.state.conns.lock().await.drain(..) {
            c.abort();
        }
    }

    /// While down, new connections are closed as soon as they open, and open ones are cut.
    pub async fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.cut().await;
        }
    }

    /// Sends connections opened from now on to `upstream` (`host:port`); open ones are
    /// left alone (call [`FaultProxy::cut`] too for a switch that resets them).
    pub fn switch_to(&self, upstream: &str) {
        if let Ok(mut u) = self.state.upstream.write() {
            *u = upstream.to_owned();
        }
    }

    /// While stalled, no byte moves either way (connections stay open).
    pub fn set_stalled(&self, stalled: bool) {
        self.state.stall.send_replace(stalled);
    }

    /// Stalls every connection open now, for good, while connections opened later pass:
    /// what a client sees of connections that went half-open (no byte, no FIN, no RST).
    pub fn stall_existing(&self) {
        self.state
            .stall_below
            .store(self.state.opened.load(Ordering::SeqCst), Ordering::SeqCst);
        // Wake the copies so they look at the new bound.
        self.state.stall.send_modify(|_| {});
    }

    /// Cuts each connection open now after it forwards `bytes` more bytes (in either
    /// direction): mid-frame for any protocol with frames longer than that. Connections
    /// opened later pass normally.
    pub fn cut_after_bytes(&self, bytes: u64) {
        self.state.cut_after.store(bytes.max(1), Ordering::SeqCst);
        self.state.cut_gen.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut conns) = self.state.conns.try_lock() {
            for c in conns.drain(..) {
                c.abort();
            }
        }
    }
}

/// One proxied connection's cut budget, shared by its two directions.
struct Conn {
    id: u64,
    gen_seen: AtomicU64,
    remaining: AtomicU64,
}

async fn pipe(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let conn = Arc::new(Conn {
        id: state.opened.fetch_add(1, Ordering::SeqCst),
        gen_seen: AtomicU64::new(state.cut_gen.load(Ordering::SeqCst)),
        remaining: AtomicU64::new(u64::MAX),
    });
    let up = copy(&mut cr, &mut sw, state.clone(), conn.clone());
    let down = copy(&mut sr, &mut cw, state.clone(), conn);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn copy<R, W>(
    reader: &mut R,
    writer: &mut W,
    state: Arc<State>,
    conn: Arc<Conn>,
) -> std::io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0_u8; 16 * 1024];
    let mut stall = state.stall.subscribe();
    loop {
        while *stall.borrow_and_update() || conn.id < state.stall_below.load(Ordering::SeqCst) {
            if stall.changed().await.is_err() {
                return Ok(());
            }
        }
        let n = tokio::select! {
            r = reader.read(&mut buf) => r?,
            _ = stall.changed() => continue,
        };
        if n == 0 {
            return Ok(());
        }
        let generation = state.cut_gen.load(Ordering::SeqCst);
        if conn.gen_seen.swap(generation, Ordering::SeqCst) != generation {
            // A cut was ordered since this connection last looked: arm it.
            conn.remaining
                .store(state.cut_after.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        let remaining = conn.remaining.load(Ordering::SeqCst);
        if remaining != u64::MAX && (n as u64) >= remaining {
            let part = usize::try_from(remaining).unwrap_or(0).min(n);
            writer.write_all(&buf[..part]).await?;
            return Ok(());
        }
        if remaining != u64::MAX {
            conn.remaining.fetch_sub(n as u64, Ordering::SeqCst);
        }
        writer.write_all(&buf[..n]).await?;
    }
}
