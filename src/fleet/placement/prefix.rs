//! A bounded set of prefix block hashes, least recently used out first: what
//! placement believes one backend's prompt cache holds.

use std::collections::{BTreeMap, HashMap};

/// A bounded set of block hashes, least recently used out first.
#[derive(Debug)]
pub struct PrefixIndex {
    capacity: usize,
    tick: u64,
    blocks: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl PrefixIndex {
    /// An empty index of at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            blocks: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// Leading blocks of `blocks` present.
    pub fn matched(&self, blocks: &[u64]) -> usize {
        blocks
            .iter()
            .take_while(|b| self.blocks.contains_key(b))
            .count()
    }

    /// Remembers `blocks` as just used, evicting the oldest beyond capacity.
    pub fn insert(&mut self, blocks: &[u64]) {
        for b in blocks {
            self.tick += 1;
            if let Some(old) = self.blocks.insert(*b, self.tick) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(self.tick, *b);
        }
        while self.blocks.len() > self.capacity {
            let Some((_, b)) = self.by_age.pop_first() else {
                break;
            };
            self.blocks.remove(&b);
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}
