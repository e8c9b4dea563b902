//! Sockets as every proxy of the mesh wants them.

use std::io;
use std::net::SocketAddr;

/// A listening socket with a deep accept queue: the default of 128 drops SYNs under a
/// burst of new connections. The error names the address.
pub fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = bind(addr)?;
    start_listening(&listener)?;
    Ok(listener)
}

/// A socket bound to `addr` (so its port is taken and known) that does not listen yet:
/// connections to it are refused, so a client moves on to another endpoint at once instead
/// of waiting on a proxy that cannot route yet. [`start_listening`] opens it.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    Ok(socket.into())
}

/// Starts listening on a socket from [`bind`] (again: harmless), with a deep accept queue.
pub fn start_listening(listener: &std::net::TcpListener) -> io::Result<()> {
    socket2::SockRef::from(listener).listen(4096)
}

/// Lets the process hold as many sockets as its hard limit allows: a proxy needs two per
/// connection, and the usual soft limit of 1024 is far too low.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
