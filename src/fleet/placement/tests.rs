//! Unit tests of placement: signatures, the prefix index, choices, sessions.

use super::*;

fn chat(system: &str, turns: &[&str]) -> Vec<u8> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    for t in turns {
        messages.push(serde_json::json!({"role": "user", "content": t}));
    }
    serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
}

fn sig(body: &[u8]) -> Signature {
    Signature::of(body, &http::HeaderMap::new()).expect("a signature")
}

fn free(id: &BackendId) -> Candidate<'_> {
    Candidate {
        id,
        free: true,
        ahead: 0,
        probed_loaded: true,
    }
}

#[test]
fn a_responses_conversation_shares_its_prefix_from_turn_to_turn() {
    let turn = |n: usize| {
        let input: Vec<Value> = (0..n)
            .map(|i| serde_json::json!({"role": "user", "content": format!("question {i}")}))
            .collect();
        let body = serde_json::json!({
            "model": "m",
            "instructions": "i".repeat(2_000),
            "input": input,
        });
        sig(&serde_json::to_vec(&body).unwrap())
    };
    let (a, b) = (turn(1), turn(2));
    assert!(
        a.blocks.len() >= 7,
        "instructions are hashed: {}",
        a.blocks.len()
    );
    assert!(b.bytes > a.bytes, "input items are hashed");
    assert_eq!(a.blocks[..], b.blocks[..a.blocks.len()]);
    let plain = serde_json::json!({"model": "m", "input": "x".repeat(600)});
    assert_eq!(sig(&serde_json::to_vec(&plain).unwrap()).bytes, 600);
}

#[test]
fn short_prompts_without_session_have_nothing_at_stake() {
    let body = br#"{"model":"m","prompt":"hello"}"#;
    assert!(!sig(body).matters());
    let mut h = http::HeaderMap::new();
    h.insert("x-session-id", "abc".parse().unwrap());
    assert!(Signature::of(body, &h).unwrap().matters());
    let keyed = br#"{"model":"m","prompt":"hi","prompt_cache_key":"k"}"#;
    assert!(sig(keyed).matters());
    assert!(Signature::of(b"[1]", &http::HeaderMap::new()).is_none());
}

#[test]
fn a_cold_least_busy_choice_waits_for_a_warm_backend_once_loads_are_known_slow() {
    let mut p = Placement::new(Routing::CacheAware);
    let (a, b) = (BackendId::Port(1), BackendId::Port(2));
    let model = ModelName::parse("m");
    p.routed(&b, None, Some(&model));
    let s = sig(br#"{"model":"m","prompt":"hi"}"#);
    let busy_b = Candidate {
        id: &b,
        free: false,
        ahead: 0,
        probed_loaded: false,
    };
    let cold_a = Candidate {
        probed_loaded: false,
        ..free(&a)
    };
    let cands = [cold_a, busy_b];
    let go_a = |c: Choice| matches!(c, Choice::Go(id, _) if id == a);
    assert!(go_a(p.choose(Some(&s), Some(&model), &cands, Some(&a), 0)));
    let slow_load = Observed {
        service: Duration::from_millis(200),
        load: Some(Duration::from_secs(3)),
        ..Observed::default()
    };
    p.observed(&b, &slow_load);
    assert_eq!(
        p.choose(Some(&s), Some(&model), &cands, Some(&a), 0),
        Choice::Wait
    );
    // A long queue for the model justifies loading it on another backend.
    assert!(go_a(p.choose(Some(&s), Some(&model), &cands, Some(&a), 40)));
}

#[test]
fn a_longer_conversation_extends_the_blocks_of_the_shorter() {
    let long = "x".repeat(2000);
    let a = sig(&chat(&long, &["first"]));
    let b = sig(&chat(&long, &["first", "second"]));
    assert!(a.blocks.len() >= 7);
    assert_eq!(a.blocks[..], b.blocks[..a.blocks.len()]);
    let other = sig(&chat(&"y".repeat(2000), &["first"]));
    assert_ne!(a.blocks[0], other.blocks[0]);
}

#[test]
fn the_index_is_bounded_and_forgets_the_least_recently_used() {
    let mut index = PrefixIndex::new(4);
    index.insert(&[1, 2, 3]);
    index.insert(&[10, 11]);
    assert_eq!(index.len(), 4);
    assert_eq!(index.matched(&[1, 2, 3]), 0, "block 1 went first");
    assert_eq!(index.matched(&[10, 11, 12]), 2);
    index.insert(&[2, 3]);
    index.insert(&[20]);
    assert_eq!(index.len(), 4);
    assert_eq!(index.matched(&[10, 11]), 0);
    assert!(!index.is_empty());
}

#[test]
fn the_backend_holding_the_prefix_wins_and_a_replaced_one_starts_empty() {
    let mut p = Placement::new(Routing::CacheAware);
    let (a, b) = (BackendId::Port(1), BackendId::Port(2));
    let long = "x".repeat(4000);
    let turn1 = sig(&chat(&long, &["first"]));
    p.routed(&b, Some(&turn1), None);
    let turn2 = sig(&chat(&long, &["first", "second"]));
    let cands = [free(&a), free(&b)];
    match p.choose(Some(&turn2), None, &cands, Some(&a), 0) {
        Choice::Go(id, placed) => {
            assert_eq!(id, b);
            assert_eq!(placed.reason, Reason::Prefix);
            assert!(placed.expected_hit_tokens >= 900, "{placed:?}");
        }
        other => panic!("{other:?}"),
    }
    p.forget(&b);
    assert_eq!(p.indexed_blocks(&b), 0);
    assert_eq!(
        p.choose(Some(&turn2), None, &cands, Some(&a), 0),
        Choice::Go(
            a.clone(),
            Placed {
                reason: Reason::LeastBusy,
                expected_hit_tokens: 0,
                cold: false
            }
        )
    );
}

#[test]
fn least_busy_mode_and_missing_signatures_keep_the_old_rule() {
    let mut p = Placement::new(Routing::LeastBusy);
    let (a, b) = (BackendId::Port(1), BackendId::Port(2));
    let s = sig(&chat(&"x".repeat(4000), &["q"]));
    p.routed(&b, Some(&s), None);
    let cands = [free(&a), free(&b)];
    let go_a = |c: Choice| matches!(c, Choice::Go(id, _) if id == a);
    assert!(go_a(p.choose(Some(&s), None, &cands, Some(&a), 0)));
    let p = Placement::new(Routing::CacheAware);
    assert!(go_a(p.choose(None, None, &cands, Some(&a), 0)));
}

#[test]
fn a_busy_affine_backend_is_waited_for_only_when_cheaper() {
    let mut p = Placement::new(Routing::CacheAware);
    let (a, b) = (BackendId::Port(1), BackendId::Port(2));
    // 40 kB of shared prefix: about 10k tokens, 5 s to recompute.
    let s = sig(&chat(&"x".repeat(40_000), &["q"]));
    p.routed(&b, Some(&s), None);
    let quick = Observed {
        service: Duration::from_millis(100),
        ..Observed::default()
    };
    p.observed(&b, &quick);
    let cands = [
        free(&a),
        Candidate {
            id: &b,
            free: false,
            ahead: 0,
            probed_loaded: true,
        },
    ];
    assert_eq!(p.choose(Some(&s), None, &cands, Some(&a), 0), Choice::Wait);
    // A short prefix is cheaper to recompute than the wait.
    let short = sig(&chat(&"y".repeat(600), &["q"]));
    p.routed(&b, Some(&short), None);
    assert!(matches!(
        p.choose(Some(&short), None, &cands, Some(&a), 0),
        Choice::Go(id, _) if id == a
    ));
}

#[test]
fn a_warm_model_with_the_same_context_is_preferred() {
    let mut p = Placement::new(Routing::CacheAware);
    let (a, b) = (BackendId::Port(1), BackendId::Port(2));
    let model = ModelName::parse("m");
    let ps = |ctx: u64| vec![serde_json::json!({"name": "m:latest", "context_length": ctx})];
    p.probed(&a, &ps(4096));
    p.probed(&b, &ps(8192));
    let load = Observed {
        load: Some(Duration::from_secs(2)),
        ..Observed::default()
    };
    p.observed(&a, &load);
    let body = br#"{"model":"m","prompt":"hi","options":{"num_ctx":8192}}"#;
    let s = sig(body);
    let cands = [free(&a), free(&b)];
    match p.choose(Some(&s), Some(&model), &cands, Some(&a), 0) {
        Choice::Go(id, placed) => {
            assert_eq!(id, b);
            assert!(!placed.cold);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sessions_stick_and_are_forgotten_with_their_backend() {
    let mut p = Placement::new(Routing::CacheAware);
    let (a, b) = (BackendId::Port(1), BackendId::Port(2));
    let mut h = http::HeaderMap::new();
    h.insert("x-session-id", "s1".parse().unwrap());
    let first = Signature::of(&chat(&"z".repeat(3000), &["q"]), &h).unwrap();
    p.routed(&b, Some(&first), None);
    // Same session, a prompt whose bytes share no block (say, re-rendered).
    let next = Signature::of(&chat(&"w".repeat(3000), &["q"]), &h).unwrap();
    let cands = [free(&a), free(&b)];
    match p.choose(Some(&next), None, &cands, Some(&a), 0) {
        Choice::Go(id, placed) => {
            assert_eq!((id, placed.reason), (b.clone(), Reason::Session));
        }
        other => panic!("{other:?}"),
    }
    p.forget(&b);
    assert!(p.sessions.is_empty() && p.session_age.is_empty());
}

#[test]
fn sessions_are_bounded_oldest_out() {
    let mut p = Placement::new(Routing::CacheAware);
    let b = BackendId::Port(2);
    for n in 0..SESSIONS as u64 + 10 {
        let s = Signature {
            session: Some(n),
            ..Signature::default()
        };
        p.routed(&b, Some(&s), None);
    }
    assert_eq!(p.sessions.len(), SESSIONS);
    assert_eq!(p.session_age.len(), SESSIONS);
    assert!(!p.sessions.contains_key(&0) && p.sessions.contains_key(&(SESSIONS as u64 + 9)));
}
