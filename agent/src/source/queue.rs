//! The queue from the sources to the proxy loop, coalescing per object: while the
//! loop is busy (a long full sync, a slow kernel), a Service that changes 1,000 times
//! waits as one entry holding its latest state, not 1,000. So the queue never holds
//! more entries than there are objects (plus one per rejected document and the
//! markers), whatever the event rate, and the loop catches up with one event per
//! object. Events keep their first position: the one for an object queued before
//! [`SourceEvent::Synced`] is still delivered before it.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::SourceEvent;
use crate::model::ObjectRef;

/// What a queued event is about; a newer event with the same key replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Object(ObjectRef),
    Synced,
    Rejected(String),
    HostAddresses,
    Question(u64),
}

impl Key {
    fn of(event: &SourceEvent, pending: &mut Pending) -> Self {
        match event {
            SourceEvent::Apply { object, .. } => Self::Object(object.object_ref()),
            SourceEvent::Delete(r) => Self::Object(r.clone()),
            SourceEvent::Synced => Self::Synced,
            SourceEvent::Rejected { origin, .. } => Self::Rejected(origin.clone()),
            SourceEvent::HostAddresses(_) => Self::HostAddresses,
            SourceEvent::Question(_) => {
                pending.questions += 1;
                Self::Question(pending.questions)
            }
        }
    }
}

#[derive(Default)]
struct Pending {
    order: VecDeque<Key>,
    latest: HashMap<Key, SourceEvent>,
    senders: usize,
    receiver_gone: bool,
    /// Questions asked so far (each gets a key of its own).
    questions: u64,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side; cloned for each source.
pub struct EventSender(Arc<Shared>);

/// The proxy loop's side.
pub struct EventReceiver(Arc<Shared>);

/// The receiver is gone (the agent is stopping).
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// A new queue.
pub fn queue() -> (EventSender, EventReceiver) {
    let shared = Arc::new(Shared::default());
    shared.lock().senders = 1;
    (EventSender(shared.clone()), EventReceiver(shared))
}

impl EventSender {
    /// Queues `event`, replacing a queued one about the same object.
    pub fn send(&self, event: SourceEvent) -> Result<(), Closed> {
        send(&self.0, event)
    }

    /// A handle that asks the loop questions through this queue without counting as
    /// a source: the loop still ends when the last source hangs up.
    pub fn asker(&self) -> Asker {
        Asker(self.0.clone())
    }
}

fn send(shared: &Shared, event: SourceEvent) -> Result<(), Closed> {
    let mut pending = shared.lock();
    if pending.receiver_gone {
        return Err(Closed);
    }
    let key = Key::of(&event, &mut pending);
    if pending.latest.insert(key.clone(), event).is_none() {
        pending.order.push_back(key);
    }
    drop(pending);
    shared.ready.notify_one();
    Ok(())
}

/// Puts operator questions ([`SourceEvent::Question`]) in the queue.
#[derive(Clone)]
pub struct Asker(Arc<Shared>);

impl Asker {
    /// Queues `question` behind the events already waiting.
    pub fn ask(&self, question: crate::explain::Question) -> Result<(), Closed> {
        send(&self.0, SourceEvent::Question(question))
    }
}

impl Clone for EventSender {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Self(self.0.clone())
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        self.0.lock().senders -= 1;
        self.0.ready.notify_all();
    }
}

impl EventReceiver {
    /// The next event, waiting up to `timeout` for one.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<SourceEvent, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut pending = self.0.lock();
        loop {
            if let Some(event) = pop(&mut pending) {
                return Ok(event);
            }
            if pending.senders == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvTimeoutError::Timeout);
            }
            pending = match self.0.ready.wait_timeout(pending, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// The next event, if one is queued.
    pub fn try_recv(&self) -> Result<SourceEvent, TryRecvError> {
        let mut pending = self.0.lock();
        match pop(&mut pending) {
            Some(event) => Ok(event),
            None if pending.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let mut pending = self.0.lock();
        pending.receiver_gone = true;
        pending.order.clear();
        pending.latest.clear();
    }
}

fn pop(pending: &mut Pending) -> Option<SourceEvent> {
    while let Some(key) = pending.order.pop_front() {
        if let Some(event) = pending.latest.remove(&key) {
            return Some(event);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    fn r(name: &str) -> ObjectRef {
        ObjectRef {
            kind: Kind::Service,
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn delete(name: &str) -> SourceEvent {
        SourceEvent::Delete(r(name))
    }

    fn drain(rx: &EventReceiver) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| match e {
                SourceEvent::Delete(r) => format!("delete {}", r.name),
                SourceEvent::Synced => "synced".into(),
                SourceEvent::Rejected { origin, .. } => format!("rejected {origin}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn events_about_one_object_coalesce_in_place() {
        let (tx, rx) = queue();
        for _ in 0..1000 {
            tx.send(delete("a")).unwrap();
            tx.send(delete("b")).unwrap();
        }
        tx.send(SourceEvent::Synced).unwrap();
        tx.send(delete("a")).unwrap();
        let rejected = |origin: &str| SourceEvent::Rejected {
            kind: None,
            origin: origin.into(),
        };
        tx.send(rejected("f#1")).unwrap();
        tx.send(rejected("f#1")).unwrap();
        assert_eq!(
            drain(&rx),
            ["delete a", "delete b", "synced", "rejected f#1"],
            "one entry per object, in first-queued order"
        );
        tx.send(delete("a")).unwrap();
        assert_eq!(drain(&rx), ["delete a"], "queued again once delivered");
    }

    #[test]
    fn the_receiver_sees_the_senders_go_and_they_see_it_go() {
        let (tx, rx) = queue();
        let second = tx.clone();
        drop(tx);
        second.send(delete("a")).unwrap();
        drop(second);
        assert!(
            rx.recv_timeout(Duration::from_secs(1)).is_ok(),
            "queued first"
        );
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(1)),
            Err(RecvTimeoutError::Disconnected)
        ));
        let (tx, rx) = queue();
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(10)),
            Err(RecvTimeoutError::Timeout)
        ));
        drop(rx);
        assert_eq!(tx.send(delete("a")), Err(Closed));
    }

    #[test]
    fn a_waiting_receiver_wakes_for_an_event() {
        let (tx, rx) = queue();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(delete("a")).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_secs(30)).is_ok());
        sender.join().unwrap();
    }
}
