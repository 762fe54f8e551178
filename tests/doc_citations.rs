//! Every document the code cites is in this repository (doc/README.md, "How the code cites").
//!
//! Scans every `.rs` file under `src/` and `tests/` (but this one, whose test data are bogus on
//! purpose), and the documents under `doc/`, for citations and checks that each one resolves:
//! - `P§x.y`, `L§x.y`, `PROTOCOL.md §x.y`, `LOCAL_API.md §x.y`, `ARCHITECTURE.md §x.y` (and `… section x`):
//!   the file exists and has a heading `## x.` / `### x.y`. Section numbers that follow in the same list
//!   (`LOCAL_API.md §17, §8`, `P§5.7–§5.8`) belong to the same file. Inside `doc/*.md` a bare `§x` is a
//!   section of that file. A `§` right after a number (`RFC 6762 §6.7`) is someone else's: skipped.
//! - `Dn` and ranges `Dn–Dm`: each decision is stated as `Decision (Dn)` somewhere in `doc/`.
//! - `vendor §X` (`§十七 FAQ 4`, `§十.4.3.1`, `§4`): the section is in the index of doc/VENDOR.md; for a
//!   citation in the code, the citation itself, as written, also appears in doc/VENDOR.md.
//! - any `<name>.md` or `path/<name>.md`: the file exists at the root, in `doc/` or next to the citing file.
//!
//! It prints every unresolved citation as `file:line: citation: why` and fails. Plain std: no outside
//! tool, no extra crate.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DOCS: [&str; 3] = ["doc/PROTOCOL.md", "doc/LOCAL_API.md", "doc/ARCHITECTURE.md"];
const VENDOR: &str = "doc/VENDOR.md";
/// This file holds bogus citations on purpose (its own test data), so the scan leaves it out.
const SELF: &str = "tests/doc_citations.rs";
const NUMERALS: [char; 10] = ['一', '二', '三', '四', '五', '六', '七', '八', '九', '十'];

/// Whose section a `§` names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A markdown file of this repository, by its path relative to the root.
    File(String),
    /// The vendor guide (doc/VENDOR.md).
    Vendor,
    /// Someone else's document (an RFC, MQTT 3.1.1, …): not ours to check.
    Foreign,
}

/// What the documents provide, loaded once.
struct Docs {
    root: PathBuf,
    /// Section numbers of the headings of each markdown file read so far.
    headings: HashMap<String, BTreeSet<String>>,
    /// Decisions stated as `Decision (Dn)`.
    decisions: BTreeSet<u32>,
    /// First cells of the index table of VENDOR.md (`十.4.3.1`, `十七 FAQ 4`).
    vendor_index: BTreeSet<String>,
    vendor_text: String,
}

/// Where a citation sits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A Rust file: the cited passage must be described in VENDOR.md.
    Code,
    /// A markdown file under doc/: a bare `§` is a section of the file itself.
    Doc,
}

struct Problem {
    at: String,
    citation: String,
    why: String,
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_numeral(c: char) -> bool {
    NUMERALS.contains(&c)
}

/// 1 → 一, 10 → 十, 17 → 十七, 20 → 二十.
fn to_numeral(n: u32) -> String {
    let digit = |d: u32| NUMERALS[(d - 1) as usize];
    match n {
        1..=10 => digit(n).to_string(),
        11..=19 => format!("十{}", digit(n - 10)),
        20..=99 if n.is_multiple_of(10) => format!("{}十", digit(n / 10)),
        20..=99 => format!("{}十{}", digit(n / 10), digit(n % 10)),
        _ => n.to_string(),
    }
}

/// The section number of a markdown heading (`## 5. Cloud link` → `5`, `### 5.6 Keep` → `5.6`).
fn heading_number(line: &str) -> Option<String> {
    let rest = line.trim_start_matches('#');
    if rest.len() == line.len() || !rest.starts_with(' ') {
        return None;
    }
    let token = rest.split_whitespace().next()?;
    let token = token.trim_end_matches('.');
    let numeric = !token.is_empty()
        && token
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    numeric.then(|| token.to_string())
}

impl Docs {
    fn load(root: &Path) -> Result<Docs, String> {
        let mut d = Docs {
            root: root.to_path_buf(),
            headings: HashMap::new(),
            decisions: BTreeSet::new(),
            vendor_index: BTreeSet::new(),
            vendor_text: String::new(),
        };
        let dir = root.join("doc");
        let entries = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md") {
                let text = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                for (i, _) in text.match_indices("Decision (D") {
                    let digits: String = text[i + 11..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    if text[i + 11 + digits.len()..].starts_with(')') {
                        if let Ok(n) = digits.parse() {
                            d.decisions.insert(n);
                        }
                    }
                }
            }
        }
        for f in DOCS.iter().chain([VENDOR].iter()) {
            if d.headings_of(f).is_none() {
                return Err(format!("{f} is missing"));
            }
        }
        d.vendor_text = fs::read_to_string(root.join(VENDOR)).map_err(|e| e.to_string())?;
        for line in d.vendor_text.lines() {
            let Some(cell) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
                continue;
            };
            let cell = cell.trim().trim_matches('`').trim();
            if cell.starts_with(is_numeral) {
                d.vendor_index.insert(cell.to_string());
            }
        }
        Ok(d)
    }

    /// The heading numbers of a markdown file (path relative to the root), read on first use.
    fn headings_of(&mut self, rel: &str) -> Option<&BTreeSet<String>> {
        if !self.headings.contains_key(rel) {
            let text = fs::read_to_string(self.root.join(rel)).ok()?;
            let set = text.lines().filter_map(heading_number).collect();
            self.headings.insert(rel.to_string(), set);
        }
        self.headings.get(rel)
    }

    /// Finds a cited markdown file: a path from the root, next to the citing file, or a bare name at
    /// the root or in doc/. Returns its path relative to the root.
    fn find_md(&self, name: &str, citing: &Path) -> Option<String> {
        let name = name.trim_start_matches("./");
        let mut tries = vec![name.to_string(), format!("doc/{name}")];
        if let Some(dir) = citing.parent() {
            tries.insert(0, dir.join(name).to_string_lossy().into_owned());
        }
        tries
            .into_iter()
            .map(|t| normalize(&t))
            .find(|t| !t.starts_with("..") && !t.starts_with('/') && self.root.join(t).is_file())
    }
}

/// `doc/../README.md` → `README.md`.
fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." if parts.last().is_some_and(|l| *l != "..") => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if p.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The section token after a `§`: `5.6` (digits and dots, no trailing dot) for our files, or for the
/// vendor guide numerals and digits (`十.4.3.1`, `十六.二.2`, `4`). Returns the token and its length.
fn section_token(s: &str, vendor: bool) -> Option<(String, usize)> {
    let ok = |c: char| c.is_ascii_digit() || (vendor && is_numeral(c));
    let mut out = String::new();
    let mut len = 0;
    let mut chars = s.char_indices().peekable();
    loop {
        let start = out.len();
        while let Some(&(_, c)) = chars.peek().filter(|(_, c)| ok(*c)) {
            out.push(c);
            chars.next();
        }
        if out.len() == start {
            // A dot not followed by a section part is punctuation, not ours.
            if out.ends_with('.') {
                out.pop();
            }
            break;
        }
        len = chars.peek().map_or(s.len(), |&(i, _)| i);
        match chars.peek() {
            Some(&(_, '.')) => {
                out.push('.');
                chars.next();
            }
            _ => break,
        }
    }
    (!out.is_empty()).then_some((out, len))
}

/// `4` → `四`, `10.4` → `十.4`, `十七` stays.
fn vendor_key(token: &str) -> String {
    let (first, rest) = token
        .split_once('.')
        .map_or((token, None), |(a, b)| (a, Some(b)));
    let first = match first.parse::<u32>() {
        Ok(n) => to_numeral(n),
        Err(_) => first.to_string(),
    };
    match rest {
        Some(r) => format!("{first}.{r}"),
        None => first,
    }
}

/// What a bare `§` (no prefix right before it) is.
enum Bare {
    /// Part of a list after a citation: `§17, §8`, `§5.7–§5.8`, `§2 and §4`.
    Continues,
    /// Right after a number, which names another document: `RFC 6762 §6.7`, `MQTT 3.1.1 §2.3.1`.
    Foreign,
    /// On its own: `of §3`, `(§5.4)`, `with §8`.
    Alone,
}

/// Only list separators: the gap between two citations of one list.
fn only_separators(gap: &str) -> bool {
    gap.split_whitespace().all(|w| {
        w == "and"
            || w == "or"
            || w.chars()
                .all(|c| matches!(c, ',' | ';' | '–' | '—' | '-' | '/' | '&'))
    })
}

/// `gap` is the text since the previous citation on the line (None: this is the first one), `before`
/// the text of the line before the `§`, without a leading comment marker, and `prev_tail` the end of
/// the previous line of the same comment block or document.
fn bare_kind(gap: Option<&str>, before: &str, prev_tail: &str) -> Bare {
    if gap.is_some_and(only_separators) {
        return Bare::Continues;
    }
    let t = before.trim_end();
    // A `§` that begins the line continues the line before.
    let t = if t.is_empty() {
        prev_tail.trim_end()
    } else {
        t
    };
    if t.ends_with(|c: char| c.is_ascii_digit()) {
        Bare::Foreign
    } else if gap.is_none() && t.ends_with([',', '–', '—', '-', '/', '&']) {
        Bare::Continues
    } else {
        Bare::Alone
    }
}

/// A line without its leading comment marker (`//`, `///`, `//!`) and indentation.
fn comment_text(line: &str) -> &str {
    let t = line.trim_start();
    match t.strip_prefix("//") {
        Some(r) => r.trim_start_matches(['/', '!']).trim_start(),
        None => t,
    }
}

/// A notation rather than a citation: `§n`, `§x.y`, `§X`, `§…` (single letters, or an ellipsis).
fn placeholder(after: &str) -> bool {
    if after.starts_with('…') {
        return true;
    }
    let word: String = after
        .chars()
        .take_while(|&c| c.is_ascii_alphanumeric() || c == '.')
        .collect();
    let word = word.trim_end_matches('.');
    !word.is_empty()
        && word
            .split('.')
            .all(|p| p.len() == 1 && p.chars().all(|c| c.is_ascii_alphabetic()))
}

/// The markdown file a prefix right before a `§` names (`P`, `L`, `PROTOCOL.md `), if any.
fn prefix_target(before: &str) -> Option<Target> {
    let mut chars = before.chars().rev();
    if let Some(p) = chars.next() {
        let alone = chars.next().is_none_or(|c| !is_word(c));
        match p {
            'P' if alone => return Some(Target::File(DOCS[0].into())),
            'L' if alone => return Some(Target::File(DOCS[1].into())),
            _ => {}
        }
    }
    let t = before.trim_end();
    for (name, path) in [
        ("PROTOCOL.md", DOCS[0]),
        ("LOCAL_API.md", DOCS[1]),
        ("ARCHITECTURE.md", DOCS[2]),
    ] {
        if t.ends_with(name) {
            return Some(Target::File(path.into()));
        }
    }
    if t.ends_with("VENDOR.md") {
        return Some(Target::File(VENDOR.into()));
    }
    if t.ends_with("vendor") && !t[..t.len() - 6].ends_with(is_word) {
        return Some(Target::Vendor);
    }
    None
}

/// Checks the `§` citations of one line. `ctx` is the document of the last prefixed citation, carried
/// across the lines of one comment block; `own` is the file itself for a bare `§` in a document.
fn check_sections(
    docs: &mut Docs,
    line: &str,
    prev_tail: &str,
    ctx: &mut Option<Target>,
    own: Option<&Target>,
    kind: Kind,
    out: &mut Vec<(String, String)>,
) {
    let text = comment_text(line);
    let offset = line.len() - text.len();
    // Where the previous citation's section number ended.
    let mut last_end: Option<usize> = None;
    for (i, _) in line.match_indices('§') {
        let before = &line[..i];
        let after = &line[i + '§'.len_utf8()..];
        let token_len = section_token(after, true).map_or(0, |t| t.1);
        let gap = last_end.map(|e| line.get(e..i).unwrap_or(""));
        last_end = Some(i + '§'.len_utf8() + token_len);
        let target = match prefix_target(before) {
            Some(t) => {
                *ctx = Some(t.clone());
                t
            }
            None => match bare_kind(gap, line.get(offset.min(i)..i).unwrap_or(""), prev_tail) {
                Bare::Foreign => {
                    *ctx = Some(Target::Foreign);
                    continue;
                }
                Bare::Continues => match ctx.clone().or_else(|| own.cloned()) {
                    Some(t) => t,
                    None => continue,
                },
                Bare::Alone => match own.cloned().or_else(|| ctx.clone()) {
                    Some(t) => t,
                    None => continue,
                },
            },
        };
        let explicit = prefix_target(before).is_some();
        if placeholder(after) {
            continue;
        }
        match target {
            Target::Foreign => {}
            Target::File(path) => {
                let Some((sec, _)) = section_token(after, false) else {
                    if explicit {
                        let shown: String = after.chars().take(12).collect();
                        out.push((format!("§{shown}"), format!("no section number for {path}")));
                    }
                    continue;
                };
                let cite = format!("{path} §{sec}");
                match docs.headings_of(&path) {
                    None => out.push((cite, format!("{path} does not exist"))),
                    Some(h) if !h.contains(&sec) => {
                        out.push((cite, format!("no heading `{sec}` in {path}")))
                    }
                    Some(_) => {}
                }
            }
            Target::Vendor => {
                let Some((sec, len)) = section_token(after, true) else {
                    let shown: String = after.chars().take(12).collect();
                    out.push((format!("vendor §{shown}"), "no vendor section".into()));
                    continue;
                };
                let rest = &after[len..];
                let faq: String = rest
                    .strip_prefix(" FAQ ")
                    .map(|r| r.chars().take_while(char::is_ascii_digit).collect())
                    .unwrap_or_default();
                let suffix = if faq.is_empty() {
                    String::new()
                } else {
                    format!(" FAQ {faq}")
                };
                let cite = format!("vendor §{sec}{suffix}");
                let key = format!("{}{suffix}", vendor_key(&sec));
                if !docs.vendor_index.contains(&key) {
                    out.push((
                        cite.clone(),
                        format!("`{key}` is not in the index of {VENDOR}"),
                    ));
                }
                if kind == Kind::Code && !contains_token(&docs.vendor_text, &cite) {
                    out.push((cite, format!("not described in {VENDOR}")));
                }
            }
        }
    }
}

/// `needle` occurs in `hay` and is not the start of a longer section (`vendor §4` in `vendor §4.1`).
fn contains_token(hay: &str, needle: &str) -> bool {
    hay.match_indices(needle).any(|(i, _)| {
        let next = hay[i + needle.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_digit() || c == '.' || is_numeral(c))
    })
}

/// Decision references: `D12`, `(D5)`, `D1–D18`. Not `0xD1`, `AA:D1:..`, `"cc": "D1"` or `D3_X`.
fn check_decisions(docs: &Docs, line: &str, out: &mut Vec<(String, String)>) {
    let b: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < b.len() {
        if b[i] != 'D' || (i > 0 && (is_word(b[i - 1]) || b[i - 1] == ':' || b[i - 1] == '-')) {
            i += 1;
            continue;
        }
        let digits: String = b[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let end = i + 1 + digits.len();
        if digits.is_empty() || digits.len() > 2 || b.get(end).is_some_and(|&c| is_word(c)) {
            i += 1;
            continue;
        }
        // A JSON or struct value that happens to look like one: `"cc": "D1"`.
        let quoted = i > 0 && b[i - 1] == '"' && b.get(end) == Some(&'"');
        let value = quoted && b[..i - 1].iter().rev().find(|c| !c.is_whitespace()) == Some(&':');
        if value {
            i = end;
            continue;
        }
        let first: u32 = digits.parse().unwrap_or(0);
        let mut last = first;
        let mut next = end;
        if matches!(b.get(end), Some('–' | '-')) && b.get(end + 1) == Some(&'D') {
            let d2: String = b[end + 2..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(n) = d2.parse::<u32>() {
                last = n;
                next = end + 2 + d2.len();
            }
        }
        let cite: String = b[i..next].iter().collect();
        if last < first || first == 0 {
            out.push((cite, "not a decision range".into()));
        } else {
            let missing: Vec<u32> = (first..=last)
                .filter(|n| !docs.decisions.contains(n))
                .collect();
            let why = match missing.as_slice() {
                [] => None,
                [one] => Some(format!("no `Decision (D{one})` in doc/")),
                [a, .., b] => Some(format!("{} of D{a}…D{b} not stated in doc/", missing.len())),
            };
            if let Some(why) = why {
                out.push((cite, why));
            }
        }
        i = next;
    }
}

/// `<name>.md` and `dir/<name>.md` file names; `section N` after one of our three documents.
fn check_files(docs: &mut Docs, line: &str, citing: &Path, out: &mut Vec<(String, String)>) {
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/');
    for (i, _) in line.match_indices(".md") {
        let end = i + 3;
        if line[end..].chars().next().is_some_and(is_word) {
            continue; // `self.mdns`
        }
        let start = line[..i]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| name_char(c))
            .last()
            .map_or(i, |(j, _)| j);
        let name = &line[start..end];
        let stem = name
            .trim_end_matches(".md")
            .rsplit('/')
            .next()
            .unwrap_or("");
        if stem.is_empty()
            || !stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            continue;
        }
        let Some(found) = docs.find_md(name, citing) else {
            out.push((name.to_string(), "no such file in the repository".into()));
            continue;
        };
        // `PROTOCOL.md section 5` (a help text that cannot use `§`).
        if let Some(rest) = line[end..].strip_prefix(" section ") {
            if let Some((sec, _)) = section_token(rest, false) {
                let ok = docs.headings_of(&found).is_some_and(|h| h.contains(&sec));
                if !ok {
                    out.push((
                        format!("{name} section {sec}"),
                        format!("no heading `{sec}`"),
                    ));
                }
            }
        }
    }
}

/// Checks one file's text. `rel` is its path relative to the root.
fn check_text(docs: &mut Docs, rel: &str, text: &str) -> Vec<Problem> {
    let kind = if rel.ends_with(".md") {
        Kind::Doc
    } else {
        Kind::Code
    };
    let own = (kind == Kind::Doc).then(|| Target::File(rel.to_string()));
    let mut problems = Vec::new();
    let mut ctx: Option<Target> = None;
    let mut prev_tail = "";
    for (n, line) in text.lines().enumerate() {
        // A prefix carries over the lines of one comment block, and no further.
        let comment = line.trim_start().starts_with("//");
        if kind == Kind::Doc || !comment {
            ctx = None;
        }
        if kind == Kind::Code && !comment {
            prev_tail = "";
        }
        let mut found = Vec::new();
        check_sections(
            docs,
            line,
            prev_tail,
            &mut ctx,
            own.as_ref(),
            kind,
            &mut found,
        );
        check_decisions(docs, line, &mut found);
        check_files(docs, line, Path::new(rel), &mut found);
        prev_tail = comment_text(line);
        for (citation, why) in found {
            problems.push(Problem {
                at: format!("{rel}:{}", n + 1),
                citation,
                why,
            });
        }
    }
    problems
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" {
                walk(&p, out);
            }
        } else if name.ends_with(".rs") && p != Path::new(ROOT).join(SELF) {
            out.push(p);
        }
    }
}

fn report(problems: &[Problem]) -> String {
    let mut s = String::new();
    for p in problems {
        let _ = writeln!(s, "{}: {}: {}", p.at, p.citation, p.why);
    }
    s
}

#[test]
fn every_citation_resolves() {
    let root = Path::new(ROOT);
    let mut docs = Docs::load(root).unwrap_or_else(|e| panic!("the documentation: {e}"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    walk(&root.join("tests"), &mut files);
    for f in fs::read_dir(root.join("doc"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if f.path().extension().is_some_and(|x| x == "md") {
            files.push(f.path());
        }
    }
    files.sort();
    assert!(
        files.len() > 20,
        "only {} files found under {ROOT}",
        files.len()
    );
    let mut problems = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .unwrap_or(f)
            .to_string_lossy()
            .replace('\\', "/");
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{rel}: {e}"));
        problems.extend(check_text(&mut docs, &rel, &text));
    }
    if !problems.is_empty() {
        eprint!("{}", report(&problems));
        panic!(
            "{} citation(s) do not resolve (listed above as file:line: citation: why)",
            problems.len()
        );
    }
}

/// The checker finds what it must find and nothing else: a bogus citation of each kind fails.
#[test]
fn bogus_citations_are_reported() {
    let mut docs = Docs::load(Path::new(ROOT)).unwrap_or_else(|e| panic!("the documentation: {e}"));
    let good = "\
// P§5.6 and L§9.2, PROTOCOL.md §2.5, LOCAL_API.md §17, §8; P§5.7–§5.8 (D7) D1–D18 [`D5`].
//! The table of LOCAL_API.md §2–§4, with the errors of
//! §3 and §19 (both the line before's file). RFC 6762 §6.7, then (§5.4) is the RFC's.
// `P§n` and `vendor §X` and `vendor §…` are notation, not citations. L§8 names the host; a legacy
//! reply (source port not 5353, RFC 6762
//! §6.7) uses 10 s: that § is the RFC's, as the line before says.
// vendor §4 and vendor §十七 FAQ 4; ARCHITECTURE.md §4.5; see tests/vectors/../bench/README.md.
let mac = \"AA:BB:CC:D1:D2:D3\"; let x = 0xD1; json!({\"cc\": \"D1\"}); self.mdns; D3_NO_NUL
";
    let problems = check_text(&mut docs, "src/example.rs", good);
    assert!(problems.is_empty(), "false alarms:\n{}", report(&problems));

    // The missing file name is put together here so that no grep over the tree finds it.
    let bad = format!(
        "\
// P§99.1
// L§9.9
// PROTOCOL.md §4.99, §77
// ARCHITECTURE.md §9
// D99 and D17–D42
// vendor §廿
// vendor §十九
// vendor §十七 FAQ 9
// vendor §十.4.2
// see {missing}.md
// PROTOCOL.md §vectors
",
        missing = "NOWHERE"
    );
    let problems = check_text(&mut docs, "tests/example.rs", &bad);
    let text = report(&problems);
    for expected in [
        "tests/example.rs:1: doc/PROTOCOL.md §99.1",
        "tests/example.rs:2: doc/LOCAL_API.md §9.9",
        "tests/example.rs:3: doc/PROTOCOL.md §4.99",
        "tests/example.rs:3: doc/PROTOCOL.md §77",
        "tests/example.rs:4: doc/ARCHITECTURE.md §9",
        "tests/example.rs:5: D99",
        "tests/example.rs:5: D17–D42",
        "tests/example.rs:6: vendor §廿",
        "tests/example.rs:7: vendor §十九",
        "tests/example.rs:8: vendor §十七 FAQ 9",
        "tests/example.rs:9: vendor §十.4.2: not described",
        &*format!("tests/example.rs:10: {}.md", "NOWHERE"),
        "tests/example.rs:11: §vectors",
    ] {
        assert!(text.contains(expected), "missed `{expected}` in:\n{text}");
    }
    assert_eq!(text.lines().count(), 15, "unexpected reports:\n{text}");

    // In a document a bare § is the document's own section.
    let problems = check_text(
        &mut docs,
        "doc/PROTOCOL.md",
        "see §5.6, §5.99 and L§8, §9.3\n",
    );
    assert_eq!(
        report(&problems),
        "doc/PROTOCOL.md:1: doc/PROTOCOL.md §5.99: no heading `5.99` in doc/PROTOCOL.md\n"
    );
}

#[test]
fn numerals() {
    assert_eq!(to_numeral(4), "四");
    assert_eq!(to_numeral(10), "十");
    assert_eq!(to_numeral(17), "十七");
    assert_eq!(vendor_key("10.4.3.1"), "十.4.3.1");
    assert_eq!(vendor_key("十六.二.2"), "十六.二.2");
    assert_eq!(section_token("5.6).", false), Some(("5.6".into(), 3)));
    assert_eq!(section_token("8. Next", false), Some(("8".into(), 1)));
    assert_eq!(
        section_token("十.4.3.1 x", true).map(|t| t.0),
        Some("十.4.3.1".into())
    );
    assert_eq!(heading_number("### 2.1 Header"), Some("2.1".into()));
    assert_eq!(heading_number("## 2. Packet"), Some("2".into()));
    assert_eq!(heading_number("## Contents"), None);
}
