//! Connections per client address, for the servers any pod can reach (DNS over TCP,
//! the HTTP servers): one client holding every slot would lock the others out, so
//! each address gets a share and its connections past it are closed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many connections each client address holds now. Entries exist only for
/// addresses with an open connection, so the map is bounded by the server's own
/// connection limit.
#[derive(Clone)]
pub struct ClientSlots {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_client: usize,
}

/// One connection's share of its client's slots; given back on drop.
pub struct ClientSlot {
    slots: ClientSlots,
    client: IpAddr,
}

impl ClientSlots {
    /// At most `per_client` connections per address.
    pub fn new(per_client: usize) -> Self {
        Self {
            open: Arc::default(),
            per_client,
        }
    }

    /// A slot for one more connection from `client`, unless it holds them all.
    pub fn take(&self, client: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(client).or_default();
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.slots.open.lock()
            && let Some(n) = open.get_mut(&self.client)
        {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share_back_when_done() {
        let slots = ClientSlots::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = slots.take(a).expect("first");
        let _second = slots.take(a).expect("second");
        assert!(slots.take(a).is_none(), "a third from the same address");
        assert!(slots.take(b).is_some(), "another address is not affected");
        drop(first);
        assert!(
            slots.take(a).is_some(),
            "a slot comes back when its connection ends"
        );
        assert!(slots.open.lock().unwrap().len() <= 2);
    }
}
