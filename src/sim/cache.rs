//! The prompt cache of one simulated server, as llama.cpp's server keeps it:
//! each parallel slot of a loaded model remembers the tokens of its last
//! request (prompt and answer), and beside the slots a host-memory cache of
//! earlier slot contents, bounded in tokens and emptied least recently used
//! first. A new request takes the free slot sharing the longest prefix with
//! its prompt (or restores a longer one from the host cache) and evaluates
//! only the tokens after it. Entries belong to one runner incarnation: a
//! reload or eviction of the model (a new `runner` number) forgets them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::tokens::{Token, common_prefix, push_text};

/// The prompt cache of one server.
pub(crate) struct PromptCache {
    parallel: usize,
    /// Host-memory cache size, in tokens.
    capacity: usize,
    // A std Mutex: short critical sections, never held across `.await`.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Slots per model index.
    slots: HashMap<usize, Vec<SlotMemory>>,
    /// Least recently used first.
    host: VecDeque<Entry>,
    host_tokens: usize,
}

#[derive(Default)]
struct SlotMemory {
    runner: u64,
    tokens: Vec<Token>,
    busy: bool,
}

struct Entry {
    model: usize,
    runner: u64,
    tokens: Vec<Token>,
}

/// A slot's memory taken by one request; dropping it stores what the slot
/// holds then (the prompt once evaluated, and the answer so far).
pub(crate) struct Lease {
    cache: Arc<PromptCache>,
    model: usize,
    runner: u64,
    /// `None`: no slot memory was free (cannot happen while the scheduler
    /// keeps its cap); nothing is remembered.
    slot: Option<usize>,
    tokens: Vec<Token>,
    /// Prompt tokens found in the cache.
    pub reused: usize,
}

impl PromptCache {
    pub(crate) fn new(parallel: usize, capacity: usize) -> Arc<PromptCache> {
        Arc::new(PromptCache {
            parallel: parallel.max(1),
            capacity,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the free slot of `model` (loaded as `runner`) that best matches
    /// `prompt`. At least one prompt token is always evaluated.
    pub(crate) fn take(self: &Arc<Self>, model: usize, runner: u64, prompt: &[Token]) -> Lease {
        let mut guard = self.lock();
        let s = &mut *guard;
        let slots = s
            .slots
            .entry(model)
            .or_insert_with(|| (0..self.parallel).map(|_| SlotMemory::default()).collect());
        for m in slots.iter_mut().filter(|m| m.runner != runner && !m.busy) {
            m.runner = runner;
            m.tokens.clear();
        }
        let best = slots
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.busy && m.runner == runner)
            .map(|(i, m)| (i, common_prefix(&m.tokens, prompt)))
            // Longest prefix; among equals the emptiest slot loses least.
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(slots[i].tokens.len())));
        let host_best = s
            .host
            .iter()
            .enumerate()
            .filter(|(_, e)| e.model == model && e.runner == runner)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .max_by_key(|&(_, n)| n);
        let Some((slot, slot_prefix)) = best else {
            return self.lease(model, runner, None, 0, prompt);
        };
        let mut reused = slot_prefix;
        if let Some((i, n)) = host_best.filter(|&(_, n)| n > slot_prefix) {
            reused = n;
            if let Some(e) = s.host.remove(i) {
                s.host.push_back(e);
            }
        }
        let old = std::mem::take(&mut slots[slot].tokens);
        slots[slot].busy = true;
        if old.len() > slot_prefix {
            self.save(s, model, runner, old);
        }
        let reused = reused.min(prompt.len().saturating_sub(1));
        self.lease(model, runner, Some(slot), reused, prompt)
    }

    fn lease(
        self: &Arc<Self>,
        model: usize,
        runner: u64,
        slot: Option<usize>,
        reused: usize,
        prompt: &[Token],
    ) -> Lease {
        Lease {
            cache: self.clone(),
            model,
            runner,
            slot,
            tokens: prompt[..reused].to_vec(),
            reused,
        }
    }

    /// Keeps `tokens` in host memory, dropping entries it extends and the
    /// least recently used ones beyond the capacity.
    fn save(&self, s: &mut State, model: usize, runner: u64, tokens: Vec<Token>) {
        if tokens.is_empty() || tokens.len() > self.capacity {
            return;
        }
        let mut freed = 0;
        s.host.retain(|e| {
            let covered = e.model == model
                && e.runner == runner
                && common_prefix(&e.tokens, &tokens) == e.tokens.len();
            if covered {
                freed += e.tokens.len();
            }
            !covered
        });
        s.host_tokens -= freed;
        s.host_tokens += tokens.len();
        s.host.push_back(Entry {
            model,
            runner,
            tokens,
        });
        while s.host_tokens > self.capacity {
            let Some(e) = s.host.pop_front() else { break };
            s.host_tokens -= e.tokens.len();
        }
    }

    /// Tokens in host memory now.
    #[cfg(test)]
    fn host_tokens(&self) -> usize {
        self.lock().host_tokens
    }
}

impl Lease {
    /// The whole prompt is now in the slot.
    pub(crate) fn evaluated(&mut self, prompt: &[Token]) {
        self.tokens.clear();
        self.tokens.extend_from_slice(prompt);
    }

    /// One generated token (its text) is now in the slot.
    pub(crate) fn output(&mut self, text: &str) {
        push_text(&mut self.tokens, text);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(slot) = self.slot else { return };
        let mut s = self.cache.lock();
        if let Some(m) = s.slots.get_mut(&self.model).and_then(|v| v.get_mut(slot)) {
            m.busy = false;
            if m.runner == self.runner {
                m.tokens = std::mem::take(&mut self.tokens);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tokens::render_prompt;

    fn run(cache: &Arc<PromptCache>, runner: u64, prompt: &[Token], answer: &str) -> usize {
        let mut lease = cache.take(0, runner, prompt);
        let reused = lease.reused;
        lease.evaluated(prompt);
        lease.output(answer);
        reused
    }

    #[test]
    fn same_prompt_again_reuses_all_but_one_token() {
        let c = PromptCache::new(1, 1000);
        let p = render_prompt(Some("a long system prompt"), "question");
        assert_eq!(run(&c, 1, &p, "answer"), 0);
        assert_eq!(run(&c, 1, &p, "answer"), p.len() - 1);
    }

    #[test]
    fn a_new_runner_forgets() {
        let c = PromptCache::new(1, 1000);
        let p = render_prompt(None, "one two three four");
        run(&c, 1, &p, "x");
        assert_eq!(run(&c, 2, &p, "x"), 0);
    }

    #[test]
    fn host_memory_brings_back_an_overwritten_slot() {
        let c = PromptCache::new(1, 1000);
        let a = render_prompt(Some("system prompt of job a"), "q1");
        let b = render_prompt(Some("other words for job b"), "q1");
        run(&c, 1, &a, "x");
        run(&c, 1, &b, "y");
        let a2 = render_prompt(Some("system prompt of job a"), "q2");
        assert_eq!(run(&c, 1, &a2, "z"), 7, "marker, five words, user marker");
    }

    #[test]
    fn host_memory_is_bounded_least_recently_used_first() {
        let c = PromptCache::new(1, 10);
        for i in 0..5 {
            let p = render_prompt(None, &format!("w{i} a b c d e"));
            run(&c, 1, &p, "x");
        }
        assert!(c.host_tokens() <= 10, "{}", c.host_tokens());
        let w0 = render_prompt(None, "w0 a b c d e");
        assert_eq!(
            run(&c, 1, &w0, "x"),
            1,
            "only the user marker is left of w0"
        );
    }

    #[test]
    fn busy_slots_are_not_shared() {
        // No host memory, which could copy the first slot's content.
        let c = PromptCache::new(2, 0);
        let p = render_prompt(None, "same prompt here");
        run(&c, 1, &p, "x");
        let first = c.take(0, 1, &p);
        let second = c.take(0, 1, &p);
        assert!(first.reused > 0);
        assert_eq!(second.reused, 0);
    }
}
