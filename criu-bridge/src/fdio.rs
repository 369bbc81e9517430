//! Async I/O on raw descriptors: pipe ends and pseudo-terminal masters alike.
use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
};
use tokio::io::unix::AsyncFd;

pub struct FdStream(AsyncFd<OwnedFd>);

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        let fl = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
        // AsyncFd::new is deprecated in favour of an unsafe constructor; the fd is owned here, which is what it asks for.
        #[allow(deprecated)]
        let afd = AsyncFd::new(fd)?;
        Ok(FdStream(afd))
    }

    /// Reads some bytes; 0 = end of stream. A terminal master's EIO (the slave side closed) is an end too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut g = self.0.readable().await?;
            match g.try_io(|fd| {
                // SAFETY: buf is valid for writes of buf.len() bytes.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut g = self.0.writable().await?;
            match g.try_io(|fd| {
                // SAFETY: data is valid for reads of data.len() bytes.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Sets a terminal's window size.
pub fn resize(fd: i32, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A runc `--console-socket`: accepts one connection and receives the pty master over SCM_RIGHTS.
pub struct ConsoleSocket {
    listener: tokio::net::UnixListener,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> io::Result<ConsoleSocket> {
        let _ = std::fs::remove_file(path);
        Ok(ConsoleSocket { listener: tokio::net::UnixListener::bind(path)? })
    }

    pub async fn receive(self, limit: Duration) -> io::Result<OwnedFd> {
        let (stream, _) = tokio::time::timeout(limit, self.listener.accept())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "runc did not send the terminal"))??;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 4096];
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    if let Some(&fd) = fds.first() {
                        // SAFETY: the kernel just installed this descriptor for us.
                        return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                    }
                }
            }
            Err(io::Error::new(io::ErrorKind::InvalidData, "no descriptor in the console socket message"))
        })
        .await
        .map_err(io::Error::other)?
    }
}
