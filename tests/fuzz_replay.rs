//! Replays every committed fuzz input through its target on the stable toolchain: each file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes to `miio_client::fuzzing::<target>`,
//! the same function `cargo fuzz` runs (fuzz/README.md). A target that panics on a file fails the
//! test, which names the file; so does a directory that names no target, or a target without a
//! corpus.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use miio_client::fuzzing;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The files of `dir/<target>/` for every target directory under `dir`, sorted.
fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(targets) = fs::read_dir(dir) else {
        return out;
    };
    for t in targets {
        let t = t.expect("a readable fuzz directory");
        let name = t.file_name().to_string_lossy().into_owned();
        assert!(
            fuzzing::target(&name).is_some(),
            "{}: no fuzz target called {name}",
            t.path().display()
        );
        for f in fs::read_dir(t.path()).expect("a readable target directory") {
            let f = f.expect("a readable corpus entry").path();
            if f.is_file() {
                out.push((name.clone(), f));
            }
        }
    }
    out.sort();
    out
}

/// Runs each input through `run(target)`; the failures as `path: message`.
fn replay(files: &[(String, PathBuf)], run: impl Fn(&str) -> fn(&[u8])) -> Vec<String> {
    // One line per failure below instead of a backtrace per panic.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let mut failed = Vec::new();
    for (target, path) in files {
        let f = run(target);
        let data = fs::read(path).expect("a readable fuzz input");
        if let Err(e) = panic::catch_unwind(|| f(&data)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", path.display()));
        }
    }
    panic::set_hook(hook);
    failed
}

fn target(name: &str) -> fn(&[u8]) {
    fuzzing::target(name).expect("checked in inputs()")
}

#[test]
fn corpus_and_regressions_replay_cleanly() {
    let root = Path::new(ROOT).join("fuzz");
    let corpus = inputs(&root.join("corpus"));
    let regressions = inputs(&root.join("regressions"));
    for (name, _) in fuzzing::TARGETS {
        assert!(
            corpus.iter().any(|(t, _)| t == name),
            "fuzz/corpus/{name}/ is missing or empty"
        );
    }
    let all: Vec<_> = corpus.into_iter().chain(regressions).collect();
    let failed = replay(&all, target);
    assert!(
        failed.is_empty(),
        "{} of {} fuzz inputs failed:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}

#[test]
fn the_replay_can_fail() {
    let dir = std::env::temp_dir().join(format!("miio-fuzz-replay-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("json_stream")).unwrap();
    fs::write(dir.join("json_stream/ok"), b"\x00\x00{\"id\":1}").unwrap();
    let files = inputs(&dir);
    assert_eq!(files.len(), 1);
    assert!(replay(&files, target).is_empty());
    // A target that panics on the input is reported with the file and the message.
    fn broken(_: &[u8]) {
        panic!("invariant broken");
    }
    let failed = replay(&files, |_| broken);
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].ends_with("json_stream/ok: invariant broken"),
        "{failed:?}"
    );
    // A directory that names no target is refused.
    fs::create_dir_all(dir.join("nonesuch")).unwrap();
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let r = panic::catch_unwind(|| inputs(&dir));
    panic::set_hook(hook);
    assert!(r.is_err(), "an unknown target directory is refused");
    let _ = fs::remove_dir_all(&dir);
}
