//! The simulator's deterministic tokenizer: one token per whitespace-separated
//! word, identified by a stable hash of the word. Chat conversations and
//! generate prompts are rendered as a template would (a role marker token
//! before each message, the assistant marker last), so that turn N+1 of a
//! conversation starts with exactly the tokens a slot holds after turn N
//! (its prompt followed by its answer).

/// One token: a stable hash of its word.
pub type Token = u32;

/// FNV-1a of `word`, stable across builds and runs.
fn token_of(word: &str) -> Token {
    let mut h: u32 = 0x811c_9dc5;
    for b in word.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Appends the tokens of `text` to `out`.
pub fn push_text(out: &mut Vec<Token>, text: &str) {
    out.extend(text.split_whitespace().map(token_of));
}

/// Appends a role marker (`<|user|>`, …).
fn push_role(out: &mut Vec<Token>, role: &str) {
    out.push(token_of(&format!("<|{role}|>")));
}

/// The prompt of `/api/generate` and `/v1/completions`.
pub fn render_prompt(system: Option<&str>, prompt: &str) -> Vec<Token> {
    let mut out = Vec::new();
    if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
        push_role(&mut out, "system");
        push_text(&mut out, s);
    }
    push_role(&mut out, "user");
    push_text(&mut out, prompt);
    push_role(&mut out, "assistant");
    out
}

/// The rendered conversation of `/api/chat` and `/v1/chat/completions`:
/// `(role, content)` pairs, then the assistant marker.
pub fn render_chat<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Token> {
    let mut out = Vec::new();
    for (role, content) in messages {
        push_role(&mut out, role);
        push_text(&mut out, content);
    }
    push_role(&mut out, "assistant");
    out
}

/// Length of the longest common prefix of `a` and `b`.
pub fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_turn_extends_prompt_plus_answer() {
        let turn1 = render_chat([("system", "be brief"), ("user", "hello there")]);
        let mut held = turn1.clone();
        push_text(&mut held, "hi how are you");
        let turn2 = render_chat([
            ("system", "be brief"),
            ("user", "hello there"),
            ("assistant", "hi how are you"),
            ("user", "fine"),
        ]);
        assert_eq!(common_prefix(&held, &turn2), held.len());
        assert!(turn2.len() > held.len());
    }

    #[test]
    fn tokens_are_words_and_stable() {
        let a = render_prompt(None, "one two  three");
        assert_eq!(a.len(), 5, "user marker, three words, assistant marker");
        assert_eq!(a, render_prompt(Some(" "), "one two three"));
        assert_eq!(common_prefix(&a, &render_prompt(None, "one two four")), 3);
    }
}
