//! Running `iptables-restore`, `iptables-save` and `nft` with a deadline. A tool that
//! hangs (a stuck lock holder, a kernel that does not answer) must not stall the
//! proxy loop forever: past its deadline the child is killed and the call fails like
//! any other failed sync, to be retried.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

/// Deadline of a call that may carry a whole table (a full restore or listing at
/// 100,000 services takes tens of seconds on a slow node).
pub const WHOLE_TABLE: Duration = Duration::from_secs(600);
/// Deadline of a small call (a partial transaction, one chain, one set).
pub const SMALL: Duration = Duration::from_secs(60);
/// Stderr kept for the error message.
const STDERR_KEPT: u64 = 1 << 20;

/// How a child ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// The start of what it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// Runs `command` (its stdin and stdout as the caller set them up; stderr is
/// captured), handing its pipes to `io`, and kills it if it has not exited after
/// `deadline`: then the result is an error of kind `TimedOut`.
pub fn run(
    command: &mut Command,
    deadline: Duration,
    io: impl FnOnce(Option<ChildStdin>, Option<ChildStdout>),
) -> std::io::Result<Finished> {
    let mut child = command.stderr(Stdio::piped()).spawn()?;
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let child = Mutex::new(child);
    let (exited, killed) = (AtomicBool::new(false), AtomicBool::new(false));
    let (done, finished) = mpsc::channel::<()>();
    let (status, stderr) = std::thread::scope(|s| {
        let (child, exited, killed) = (&child, &exited, &killed);
        s.spawn(move || {
            if finished.recv_timeout(deadline) == Err(mpsc::RecvTimeoutError::Timeout) {
                kill_if_running(child, exited, killed);
            }
        });
        let stderr = s.spawn(move || read_stderr(stderr));
        io(stdin, stdout);
        let status = wait(child, exited);
        drop(done);
        (status, stderr.join().unwrap_or_default())
    });
    if killed.load(Ordering::Acquire) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("killed after {} s", deadline.as_secs()),
        ));
    }
    Ok(Finished {
        status: status?,
        stderr,
    })
}

/// The whole of stderr is read (so the child never blocks on it); the start is kept.
fn read_stderr(stderr: Option<std::process::ChildStderr>) -> Vec<u8> {
    let mut kept = Vec::new();
    if let Some(mut stderr) = stderr {
        let _ = (&mut stderr).take(STDERR_KEPT).read_to_end(&mut kept);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
    }
    kept
}

/// Kills the child unless it has exited: the exit is noted under the lock before
/// the child is reaped, and until it is reaped its process ID stays its own (a
/// zombie), so no other process is ever signalled.
fn kill_if_running(child: &Mutex<Child>, exited: &AtomicBool, killed: &AtomicBool) {
    let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
    if !exited.load(Ordering::Acquire) {
        let _ = child.kill();
        killed.store(true, Ordering::Release);
    }
}

/// Waits for the child to exit (without holding the lock while it runs), then
/// reaps it.
fn wait(child: &Mutex<Child>, exited: &AtomicBool) -> std::io::Result<ExitStatus> {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let pid = child.lock().unwrap_or_else(|e| e.into_inner()).id();
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    // WNOWAIT: told of the exit, the child stays unreaped (see `kill_if_running`).
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => break,
        }
    }
    let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
    exited.store(true, Ordering::Release);
    child.wait()
}

/// Writes `input` to the child's stdin, if it has one, and closes it; the error,
/// if writing failed (the child exited early, or was killed).
pub fn feed(
    stdin: Option<ChildStdin>,
    input: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Option<std::io::Error> {
    let stdin = stdin?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 16, stdin);
    input(&mut writer).and_then(|()| writer.flush()).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_come_back() {
        let mut out = String::new();
        let finished = run(
            Command::new("sh")
                .args(["-c", "read line; echo \"got $line\"; echo oops >&2; exit 3"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
            SMALL,
            |stdin, stdout| {
                assert!(feed(stdin, |w| w.write_all(b"hello\n")).is_none());
                let _ = stdout.expect("piped").read_to_string(&mut out);
            },
        )
        .unwrap();
        assert_eq!(out, "got hello\n");
        assert_eq!(finished.status.code(), Some(3));
        assert_eq!(finished.stderr, b"oops\n");
    }

    #[test]
    fn a_hanging_child_is_killed_at_its_deadline() {
        // It never reads its input: the write blocks until the child is killed.
        let result = run(
            Command::new("sleep").arg("600").stdin(Stdio::piped()),
            Duration::from_millis(200),
            |stdin, _| {
                let big = vec![b'#'; 8 << 20];
                assert!(feed(stdin, |w| w.write_all(&big)).is_some());
            },
        );
        let e = result.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    }
}
