//! TCP keepalives, so that a half-open connection (a peer gone without a FIN: a crashed
//! host, a dropped NAT entry, a partition) is noticed in seconds rather than after the
//! kernel's default of two hours, or the ~15 minutes of retransmissions of a write.
//!
//! Used on the producer's accepted HTTP connections and the Redis connections. PostgreSQL
//! connections are made by sqlx, which exposes no socket options; there the server's
//! `tcp_keepalives_*` and `tcp_user_timeout` session settings (see `db`) and client-side
//! timeouts on every call stand in. RabbitMQ connections use AMQP heartbeats (10 s).

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Longest that written data may stay unacknowledged before the kernel drops the
/// connection (TCP_USER_TIMEOUT); covers a peer that vanishes while data is in flight,
/// which keepalives (idle connections only) do not.
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The keepalive parameters above.
pub fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES)
}

/// Turns keepalives and the user timeout on for a connected socket.
///
/// # Errors
/// When the socket refuses the options.
pub fn tune(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(&keepalive())?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}
