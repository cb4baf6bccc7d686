//! TCP sockets created inside a lab namespace (they stay in it for life).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::{LabError, Netns};

/// Socket options for [`tcp_connect`]. `Default` is a plain blocking connect
/// without keepalive and without a connect timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOpts {
    /// `SO_KEEPALIVE`. Implied when any of the three `keep*` values is set.
    pub keepalive: bool,
    /// `TCP_KEEPIDLE` (whole seconds).
    pub keepidle: Option<Duration>,
    /// `TCP_KEEPINTVL` (whole seconds).
    pub keepintvl: Option<Duration>,
    /// `TCP_KEEPCNT`.
    pub keepcnt: Option<u32>,
    /// `TCP_USER_TIMEOUT` (milliseconds).
    pub user_timeout: Option<Duration>,
    /// Give up connecting after this long (`ErrorKind::TimedOut`).
    pub connect_timeout: Option<Duration>,
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// Bind to this local address before connecting.
    pub bind: Option<SocketAddr>,
}

impl ConnectOpts {
    /// No options: same as `Default`.
    pub fn new() -> Self {
        Self::default()
    }

    /// `SO_KEEPALIVE` with idle, interval and count.
    #[must_use]
    pub fn keepalive(mut self, idle: Duration, intvl: Duration, cnt: u32) -> Self {
        self.keepalive = true;
        self.keepidle = Some(idle);
        self.keepintvl = Some(intvl);
        self.keepcnt = Some(cnt);
        self
    }

    /// `SO_KEEPALIVE` only (the namespace's `tcp_keepalive_*` sysctls apply).
    #[must_use]
    pub fn keepalive_on(mut self) -> Self {
        self.keepalive = true;
        self
    }

    /// `TCP_USER_TIMEOUT`.
    #[must_use]
    pub fn user_timeout(mut self, t: Duration) -> Self {
        self.user_timeout = Some(t);
        self
    }

    /// Connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = Some(t);
        self
    }

    /// `TCP_NODELAY`.
    #[must_use]
    pub fn nodelay(mut self) -> Self {
        self.nodelay = true;
        self
    }

    /// Bind to a local address first.
    #[must_use]
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Sets the socket options (not `bind` or the connect timeout) on a
    /// connection that exists already: an accepted one, or one whose
    /// options change while it lives.
    pub fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        set_opts(&SockRef::from(stream), self)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// A listening TCP socket (`SO_REUSEADDR`, backlog 1024) in `ns`. Port 0
/// picks a free port: read it back with `local_addr()`.
pub fn tcp_listen(ns: &Netns, addr: SocketAddr) -> Result<TcpListener, LabError> {
    let name = ns.name().to_owned();
    ns.run_in(move || -> Result<TcpListener, LabError> {
        let what = format!("listen {addr} in {name}");
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(io_err(what.clone()))?;
        sock.set_reuse_address(true).map_err(io_err(what.clone()))?;
        if addr.is_ipv6() {
            sock.set_only_v6(true).map_err(io_err(what.clone()))?;
        }
        sock.bind(&addr.into()).map_err(io_err(what.clone()))?;
        sock.listen(1024).map_err(io_err(what))?;
        Ok(sock.into())
    })?
}

/// A TCP connection from `ns` to `addr` with the socket options of `opts`
/// set before `connect`. A connect failure is [`LabError::Io`]; its
/// [`LabError::io_kind`] tells `TimedOut` from `ConnectionRefused`.
pub fn tcp_connect(
    ns: &Netns,
    addr: SocketAddr,
    opts: &ConnectOpts,
) -> Result<TcpStream, LabError> {
    let name = ns.name().to_owned();
    ns.run_in(move || -> Result<TcpStream, LabError> {
        let what = format!("connect {addr} from {name}");
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(io_err(what.clone()))?;
        set_opts(&sock, opts).map_err(io_err(format!("{what}: socket options")))?;
        if let Some(local) = opts.bind {
            sock.bind(&local.into())
                .map_err(io_err(format!("{what}: bind {local}")))?;
        }
        match opts.connect_timeout {
            Some(t) => sock.connect_timeout(&addr.into(), t),
            None => sock.connect(&addr.into()),
        }
        .map_err(io_err(what))?;
        Ok(sock.into())
    })?
}

fn set_opts(sock: &Socket, opts: &ConnectOpts) -> std::io::Result<()> {
    if opts.nodelay {
        sock.set_tcp_nodelay(true)?;
    }
    let mut ka = TcpKeepalive::new();
    let mut any = false;
    if let Some(t) = opts.keepidle {
        ka = ka.with_time(t);
        any = true;
    }
    if let Some(t) = opts.keepintvl {
        ka = ka.with_interval(t);
        any = true;
    }
    if let Some(n) = opts.keepcnt {
        ka = ka.with_retries(n);
        any = true;
    }
    if any {
        // Sets SO_KEEPALIVE too.
        sock.set_tcp_keepalive(&ka)?;
    } else if opts.keepalive {
        sock.set_keepalive(true)?;
    }
    if let Some(t) = opts.user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}
