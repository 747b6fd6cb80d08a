//! Texts being embedded right now, so that a text missed by two slices at once is
//! computed once: the first claims it, the others wait for its vector.
//!
//! Slices of one stream run concurrently (`ingest.stream_parallelism`), and streams run
//! side by side: without this, a text repeated a few slices apart misses the cache in
//! each slice that sees it before the first one has finished. A claim is
//! released when its vector is published or when the claimant is dropped (a cancelled
//! stream); waiters then compute the text themselves, so nothing waits for ever.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Waiters = Vec<oneshot::Sender<Arc<[f32]>>>;

#[derive(Default)]
pub struct InFlightTexts {
    pending: Mutex<HashMap<u128, Waiters>>,
}

/// What a slice got for its missed keys.
pub struct Claimed<'a> {
    /// Keys this slice computes (and must publish through `claim`).
    pub mine: Vec<usize>,
    /// Keys another slice is computing: (index into the keys, its vector to come).
    pub theirs: Vec<(usize, oneshot::Receiver<Arc<[f32]>>)>,
    pub claim: Claim<'a>,
}

/// The keys a slice claimed; dropping it releases the unpublished ones.
pub struct Claim<'a> {
    owner: &'a InFlightTexts,
    keys: Vec<u128>,
}

impl InFlightTexts {
    /// Splits `keys` into those this caller computes and those already being computed.
    pub fn claim(&self, keys: &[u128]) -> Claimed<'_> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (mut mine, mut theirs, mut claimed) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &k) in keys.iter().enumerate() {
            match pending.entry(k) {
                Entry::Occupied(mut e) => {
                    let (tx, rx) = oneshot::channel();
                    e.get_mut().push(tx);
                    theirs.push((i, rx));
                }
                Entry::Vacant(e) => {
                    e.insert(Vec::new());
                    mine.push(i);
                    claimed.push(k);
                }
            }
        }
        Claimed {
            mine,
            theirs,
            claim: Claim {
                owner: self,
                keys: claimed,
            },
        }
    }

    /// Keys being computed now.
    pub fn len(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Claim<'_> {
    /// Hands each claimed key's vector to whoever waits for it, and releases every claim:
    /// a claimed key not among `vectors` is released as a dropped claim is (its waiters
    /// compute it themselves), never left claimed with its waiters waiting for ever.
    pub fn publish<'v>(mut self, vectors: impl IntoIterator<Item = &'v (u128, Arc<[f32]>)>) {
        // Sorted before the lock is taken: each published key is found in O(log n).
        self.keys.sort_unstable();
        let mut pending = self.owner.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in vectors {
            if self.keys.binary_search(k).is_err() {
                continue;
            }
            if let Some(waiters) = pending.remove(k) {
                for w in waiters {
                    let _ = w.send(v.clone());
                }
            }
        }
        for k in self.keys.drain(..) {
            pending.remove(&k);
        }
    }
}

impl Drop for Claim<'_> {
    /// Unpublished claims (an error, a cancelled stream): waiters see their channel close
    /// and compute the text themselves.
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut pending = self.owner.pending.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            pending.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_computed_once_and_a_dropped_claim_frees_its_waiters() {
        let texts = InFlightTexts::default();
        let first = texts.claim(&[1, 2]);
        assert_eq!(first.mine, vec![0, 1]);
        let second = texts.claim(&[2, 3]);
        assert_eq!(second.mine, vec![1]);
        assert_eq!(second.theirs.len(), 1);
        assert_eq!(second.theirs[0].0, 0);

        let v: Arc<[f32]> = Arc::from(vec![0.5f32; 4]);
        first.claim.publish(&[(1, v.clone()), (2, v.clone())]);
        let (_, rx) = second.theirs.into_iter().next().unwrap();
        assert_eq!(&*rx.await.unwrap(), &*v);
        // Key 3 is still claimed by `second`; a third caller waits on it.
        let third = texts.claim(&[3]);
        assert!(third.mine.is_empty());
        drop(second.claim);
        let (_, rx) = third.theirs.into_iter().next().unwrap();
        assert!(
            rx.await.is_err(),
            "a dropped claim closes its waiters' channels"
        );
        assert!(texts.is_empty());
    }

    /// A claimant that publishes fewer vectors than it claimed (it found some in the cache
    /// on its second look) releases the rest: their waiters hear at once and compute them,
    /// and the next caller may claim them.
    #[tokio::test]
    async fn publishing_releases_every_claimed_key() {
        let texts = InFlightTexts::default();
        let first = texts.claim(&[1, 2]);
        let second = texts.claim(&[2]);
        let v: Arc<[f32]> = Arc::from(vec![0.25f32; 4]);
        // A vector for a key it never claimed is not handed out as if it were.
        let other = texts.claim(&[9]);
        first.claim.publish(&[(1, v.clone()), (9, v.clone())]);
        let (_, rx) = second.theirs.into_iter().next().unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), rx)
            .await
            .expect("a waiter on an unpublished claim must not wait for ever");
        assert!(
            waited.is_err(),
            "released, not answered: it computes the text"
        );
        assert_eq!(texts.claim(&[2]).mine, vec![0], "key 2 is free again");
        assert_eq!(
            texts.len(),
            1,
            "only key 9, still claimed by its own caller"
        );
        drop(other.claim);
        assert!(texts.is_empty());
    }
}
