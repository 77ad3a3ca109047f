//! The crate's layers, checked from its source: no files of `src/` import
//! each other in a circle, and the lower layers import nothing of the
//! higher ones (README, "Layout"). Reads the files as text: `use` trees and
//! inline `crate::`/`super::` paths, each resolved through re-exports to
//! the file that defines the name. A child module's arrows to its own
//! parents (`super::Thing` where the parent defines `Thing`) are no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (importing module, imported module): arrows that must never exist.
/// `fleet` is the pure core; `sim` shares no code with the proxy so that
/// it cannot share its bugs; the leaves import no layer above them.
const FORBIDDEN: &[(&str, &str)] = &[
    ("fleet", "proxy"),
    ("fleet", "metrics"),
    ("fleet", "demo"),
    ("fleet", "register"),
    ("fleet", "sim"),
    ("config", "fleet"),
    ("config", "proxy"),
    ("model", "fleet"),
    ("model", "proxy"),
    ("metrics", "proxy"),
    ("sim", "proxy"),
    ("sim", "fleet"),
    ("sim", "metrics"),
];

/// One source file: its module path and its code with comments and
/// literals blanked out.
struct File {
    path: PathBuf,
    module: Vec<String>,
    code: String,
}

#[test]
fn src_has_no_import_circle_and_layers_point_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_tree(&root);
    let graph = imports(&files);

    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        for to in tos {
            let (a, b) = (&files[*from].module, &files[*to].module);
            for (low, high) in FORBIDDEN {
                if a.first().map(String::as_str) == Some(low)
                    && b.first().map(String::as_str) == Some(high)
                {
                    wrong.push(format!("{} -> {}", rel(&files[*from]), rel(&files[*to])));
                }
            }
        }
    }
    // A child module's use of what its parent defines (`super::`) runs back
    // up inside one module, as `farm-studio look` draws it: no circle of its
    // own. Every other arrow counts.
    let across: BTreeMap<usize, BTreeSet<usize>> = graph
        .iter()
        .map(|(&a, tos)| {
            let up = |b: &usize| {
                files[*b].module.len() < files[a].module.len()
                    && files[a].module.starts_with(&files[*b].module)
            };
            (a, tos.iter().copied().filter(|b| !up(b)).collect())
        })
        .collect();
    // Each circle with the arrows inside it, so that the message says what to cut.
    let circles: Vec<String> = circles(&across, files.len())
        .into_iter()
        .map(|c| {
            let arrows: Vec<String> = c
                .iter()
                .flat_map(|&a| {
                    let inside = across[&a].iter().filter(|b| c.contains(b));
                    inside.map(move |&b| (a, b))
                })
                .map(|(a, b)| format!("{} -> {}", rel(&files[a]), rel(&files[b])))
                .collect();
            arrows.join("; ")
        })
        .collect();
    assert!(
        wrong.is_empty() && circles.is_empty(),
        "arrows against the layers:\n  {}\nimport circles:\n  {}",
        wrong.join("\n  "),
        circles.join("\n  ")
    );
}

/// The checker itself finds what it must: a circle and a layer breach in a
/// made-up tree (so that the test above cannot pass by reading nothing).
#[test]
fn the_checker_sees_circles_and_re_exports() {
    let files = vec![
        file("lib.rs", &[], "pub mod fleet; pub mod proxy;"),
        file(
            "fleet/mod.rs",
            &["fleet"],
            "mod backend; pub use backend::Id; fn f() { crate::proxy::go(); }",
        ),
        file("fleet/backend.rs", &["fleet", "backend"], "pub struct Id;"),
        file(
            "proxy/mod.rs",
            &["proxy"],
            "use crate::fleet::{Id, self as fl}; pub fn go() {}",
        ),
    ];
    let graph = imports(&files);
    let names = |i: usize| files[i].path.to_string_lossy().into_owned();
    let arrows: BTreeSet<(String, String)> = graph
        .iter()
        .flat_map(|(f, ts)| ts.iter().map(move |t| (names(*f), names(*t))))
        .collect();
    let expect = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert!(arrows.contains(&expect("proxy/mod.rs", "fleet/backend.rs")));
    assert!(arrows.contains(&expect("proxy/mod.rs", "fleet/mod.rs")));
    assert!(arrows.contains(&expect("fleet/mod.rs", "proxy/mod.rs")));
    assert!(arrows.contains(&expect("fleet/mod.rs", "fleet/backend.rs")));
    let found = circles(&graph, files.len());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].len(), 2);
}

fn file(path: &str, module: &[&str], code: &str) -> File {
    File {
        path: PathBuf::from(path),
        module: module.iter().map(|s| s.to_string()).collect(),
        code: strip(code),
    }
}

fn rel(f: &File) -> String {
    format!("src/{}", f.path.display())
}

fn read_tree(root: &Path) -> Vec<File> {
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                paths.push(path);
            }
        }
    }
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mut module: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                // The binary is another crate: it sees the library as `corral::`.
                Some("main") if module.len() == 1 => return None,
                Some("lib") if module.len() == 1 => module.clear(),
                Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            let code = strip(&std::fs::read_to_string(&path).unwrap());
            Some(File {
                path: rel,
                module,
                code,
            })
        })
        .collect()
}

/// Code with comments, string and char literals replaced by spaces.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let at = |j: usize| c.get(j).copied();
        let rest = |k: usize| at(i + k);
        if c[i] == '/' && rest(1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && rest(1) == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r' && (rest(1) == Some('"') || rest(1) == Some('#')) && raw_start(&c, i)
        {
            let mut j = i + 1;
            let mut hashes = 0;
            while c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1; // the opening quote
            loop {
                if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                    i = j + 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' && (rest(2) == Some('\'') || rest(1) == Some('\\')) {
            // A char literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            i += 1;
            while c[i] != '\'' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Whether `r` at `i` starts a raw string (not the end of an identifier).
fn raw_start(c: &[char], i: usize) -> bool {
    let ident = |p: Option<usize>| p.is_some_and(|p| c[p].is_alphanumeric() || c[p] == '_');
    let before = i.checked_sub(1);
    // `br"..."` is raw too; `for"` or `var"` cannot occur.
    let byte_prefix =
        before.is_some_and(|p| c[p] == 'b') && !ident(before.and_then(|p| p.checked_sub(1)));
    if ident(before) && !byte_prefix {
        return false;
    }
    let mut j = i + 1;
    while c.get(j) == Some(&'#') {
        j += 1;
    }
    c.get(j) == Some(&'"')
}

/// For each file, the files it imports.
fn imports(files: &[File]) -> BTreeMap<usize, BTreeSet<usize>> {
    let by_module: BTreeMap<&[String], usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.as_slice(), i))
        .collect();
    let resolver = Resolver { files, by_module };
    let mut graph = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let mut targets = BTreeSet::new();
        for (inline, path) in paths_of(&f.code) {
            if let Some(abs) = resolver.absolute(f, &inline, &path) {
                let target = resolver.resolve(&abs, 0);
                if target != i {
                    targets.insert(target);
                }
            }
        }
        graph.insert(i, targets);
    }
    graph
}

struct Resolver<'a> {
    files: &'a [File],
    by_module: BTreeMap<&'a [String], usize>,
}

impl Resolver<'_> {
    /// `path` as written in `f`, made absolute from the crate root, or None
    /// for a path into another crate.
    fn absolute(&self, f: &File, inline: &[String], path: &[String]) -> Option<Vec<String>> {
        let mut base = f.module.clone();
        base.extend(inline.iter().cloned());
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop();
                    rest = &rest[1..];
                }
                if base.len() < f.module.len() {
                    // Out of the file: inline modules no longer apply.
                } else {
                    // Still inside this file: its module path names it.
                    base.truncate(f.module.len());
                }
            }
            Some(first) => {
                // A child module of this file (`use scheduler::Want` in fleet/mod.rs).
                let mut child = f.module.clone();
                child.push(first.to_string());
                if !self.by_module.contains_key(child.as_slice()) {
                    return None;
                }
            }
            None => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file that defines what `abs` names: the deepest module on the
    /// path, or, for an item that module re-exports, the file it came from.
    fn resolve(&self, abs: &[String], depth: usize) -> usize {
        let mut n = abs.len();
        while !self.by_module.contains_key(&abs[..n]) {
            n -= 1;
        }
        let module = self.by_module[&abs[..n]];
        let Some(item) = abs.get(n) else {
            return module;
        };
        if depth > 8 || defines(&self.files[module].code, item) {
            return module;
        }
        let f = &self.files[module];
        for reexport in re_exports(&f.code) {
            if reexport.last() == Some(item) {
                if let Some(from) = self.absolute(f, &[], &reexport) {
                    return self.resolve(&from, depth + 1);
                }
            }
        }
        module
    }
}

/// Whether `code` defines an item called `name`.
fn defines(code: &str, name: &str) -> bool {
    const KINDS: [&str; 9] = [
        "struct",
        "enum",
        "fn",
        "trait",
        "type",
        "const",
        "static",
        "mod",
        "macro_rules!",
    ];
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!'))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .any(|w| KINDS.contains(&w[0]) && w[1] == name)
}

/// Every path a `use` in `code` brings in: a child module sees those of
/// its parent through `super::`, `pub` or not.
fn re_exports(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (start, _) in code.match_indices("use ") {
        let before = code[..start].bytes().last();
        if before.is_some_and(is_ident) {
            continue;
        }
        let tree = &code[start + "use ".len()..];
        let end = tree.find(';').unwrap_or(tree.len());
        expand(&tree[..end], &mut Vec::new(), &mut out);
    }
    out
}

/// Every path in `code`: the leaves of each `use` tree and each inline
/// `crate::`, `super::` or `self::` path.
/// Each comes with the inline modules (`mod tests { .. }`) it stands in.
fn paths_of(code: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    // Open braces, each with the inline module it opened, if any.
    let mut braces: Vec<Option<String>> = Vec::new();
    let mut pending_mod: Option<String> = None;
    let inline = |braces: &Vec<Option<String>>| -> Vec<String> {
        braces.iter().flatten().cloned().collect()
    };
    let mut i = 0;
    while i < code.len() {
        match bytes[i] {
            b'{' => braces.push(pending_mod.take()),
            b'}' => {
                braces.pop();
            }
            b';' => pending_mod = None,
            _ => {}
        }
        let word_start = i == 0 || !is_ident(bytes[i - 1]);
        if word_start && code[i..].starts_with("mod ") {
            let name: String = code[i + 4..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            pending_mod = Some(name);
            i += 4;
            continue;
        }
        if word_start && code[i..].starts_with("use ") {
            let tree = &code[i + 4..];
            let end = tree.find(';').unwrap_or(tree.len());
            let mut paths = Vec::new();
            expand(&tree[..end], &mut Vec::new(), &mut paths);
            out.extend(paths.into_iter().map(|p| (inline(&braces), p)));
            i += 4 + end;
            continue;
        }
        if word_start {
            for head in ["crate::", "super::", "self::"] {
                if code[i..].starts_with(head) {
                    let len = code[i..]
                        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .unwrap_or(code.len() - i);
                    let path: Vec<String> = code[i..i + len]
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    out.push((inline(&braces), path));
                    i += len;
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The leaf paths of a `use` tree such as `a::{b, c::{d, self}, e as f}`.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = segments(&tree[..open]);
        let depth = prefix.len();
        prefix.extend(head);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        for part in split_top(inner) {
            expand(part, prefix, out);
        }
        prefix.truncate(depth);
    } else {
        let name = tree.split(" as ").next().unwrap_or("").trim();
        let mut path = prefix.clone();
        for seg in segments(name) {
            if seg != "self" || path.is_empty() {
                path.push(seg);
            }
        }
        if path.last().is_some_and(|l| l != "*") && !path.is_empty() {
            out.push(path);
        } else if !path.is_empty() {
            path.pop();
            out.push(path);
        }
    }
}

fn segments(s: &str) -> Vec<String> {
    s.split("::")
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// `a, b::{c, d}, e` split at the commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// The strongly connected components of more than one file (Tarjan's).
fn circles(graph: &BTreeMap<usize, BTreeSet<usize>>, n: usize) -> Vec<Vec<usize>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<usize, BTreeSet<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        found: Vec<Vec<usize>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in self.graph.get(&v).into_iter().flatten() {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in 0..n {
        if walk.index[v].is_none() {
            walk.visit(v);
        }
    }
    walk.found
}
