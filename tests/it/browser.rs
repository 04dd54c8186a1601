//! The demo page in a real browser: headless Chromium driven over the DevTools protocol
//! (`--remote-debugging-pipe`: JSON messages ending in NUL on file descriptors 3 and 4, so no
//! WebSocket client is needed). It opens `/`, uploads a rendered lab panel through the file
//! input, waits for the table, checks it against the server's own answer for the same image,
//! and saves a screenshot (`$CARGO_TARGET_TMPDIR/serve-demo.png`; the README's picture).
//!
//! Chromium is the Debian package `chromium`; `.ci/run` installs it. With `CI=true` a missing
//! browser fails the test; elsewhere the test says so and returns.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::serve::{multipart, post, Server};

/// The first Chromium binary on this machine.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |d| d.join(name))
        })
        .find(|p| p.is_file())
}

/// A pipe whose ends are closed on exec (the child gets dups of the ends it needs).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fresh descriptors that we own from here on.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A headless Chromium and one attached page session.
struct Browser {
    child: Child,
    to: File,
    from: BufReader<File>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (cmd_read, cmd_write) = pipe();
        let (evt_read, evt_write) = pipe();
        let (r, w) = (cmd_read.as_raw_fd(), evt_write.as_raw_fd());
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--window-size=1280,860",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(profile.path().join("stderr.log")).unwrap());
        // SAFETY: only async-signal-safe fcntl/dup2 calls between fork and exec. The ends are
        // first copied above 10, so neither can already be 3 or 4 (dup2 onto itself would keep
        // close-on-exec); dup2 then gives Chromium descriptors 3 and 4 without it.
        unsafe {
            cmd.pre_exec(move || {
                let (r, w) = (
                    libc::fcntl(r, libc::F_DUPFD, 10),
                    libc::fcntl(w, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting chromium");
        drop((cmd_read, evt_write));
        Browser {
            child,
            to: File::from(cmd_write),
            from: BufReader::new(File::from(evt_read)),
            next_id: 0,
            session: None,
            _profile: profile,
        }
    }

    /// Sends one command (to the page session once attached) and returns its `result`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self.to.write_all(&bytes) {
            panic!("sending {method} to chromium: {e}; its log: {}", self.log());
        }
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf).unwrap_or(0);
            assert!(
                n > 0,
                "chromium closed the DevTools pipe during {method}: {}",
                self.log()
            );
            buf.pop();
            let v: Value = serde_json::from_slice(&buf).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// What Chromium wrote to stderr (why it stopped).
    fn log(&self) -> String {
        let _ = self;
        std::fs::read_to_string(self._profile.path().join("stderr.log")).unwrap_or_default()
    }

    /// Evaluates `js` in the page, returning its value.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `js` until it is true (at most `limit`).
    fn wait_for(&mut self, js: &str, limit: Duration) {
        let t = Instant::now();
        while self.eval(js) != json!(true) {
            assert!(t.elapsed() < limit, "timed out waiting for `{js}`");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_demo_page_uploads_a_document_and_shows_the_servers_items_in_a_real_browser() {
    let Some(binary) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: chromium must be installed (.ci/run installs the Debian package)"
        );
        eprintln!("skipping: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let server = Server::start(&["--max-new-tokens", "24"]);
    let tmp = tempfile::tempdir().unwrap();
    let pages = medpipe::bench::inputs::evaluation_documents().unwrap();
    let doc = tmp.path().join(format!("{}.png", pages[0].name));
    pages[0].image.save(&doc).unwrap();

    let mut b = Browser::launch(&binary);
    let targets = b.call("Target.getTargets", json!({}));
    let page = targets["targetInfos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .expect("a page target")["targetId"]
        .clone();
    let attached = b.call(
        "Target.attachToTarget",
        json!({"targetId": page, "flatten": true}),
    );
    b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    b.call("Page.enable", json!({}));
    b.call("Runtime.enable", json!({}));
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": false}),
    );
    b.call("Page.navigate", json!({"url": server.url("/")}));
    b.wait_for(
        "document.readyState === 'complete' && document.getElementById('model').textContent.includes('variant')",
        Duration::from_secs(30),
    );

    // Choose the file through the page's own file input, as a user would.
    let root = b.call("DOM.getDocument", json!({}))["root"]["nodeId"].clone();
    let input = b.call(
        "DOM.querySelector",
        json!({"nodeId": root, "selector": "#file"}),
    )["nodeId"]
        .clone();
    b.call(
        "DOM.setFileInputFiles",
        json!({"nodeId": input, "files": [doc.display().to_string()]}),
    );
    b.wait_for(
        "['done', 'error'].includes(document.body.dataset.state)",
        Duration::from_secs(120),
    );
    assert_eq!(
        b.eval("document.body.dataset.state"),
        "done",
        "page status: {}",
        b.eval("document.getElementById('status').textContent")
    );

    // The server's answer for the same image, asked directly: greedy, so the same text.
    let bytes = std::fs::read(&doc).unwrap();
    let (ct, body) = multipart(&[("image", Some("page.png"), &bytes)]);
    let direct = post(&ureq::agent(), &server.url("/v1/extract"), Some(&ct), &body).json();
    let shown = b.eval("document.getElementById('raw').textContent");
    assert_eq!(
        shown, direct["raw_answer"],
        "the page shows the server's answer"
    );
    let rows = b.eval(
        "JSON.stringify([...document.querySelectorAll('#items tbody tr')].map(r => [...r.cells].map(c => c.textContent)))",
    );
    let rows: Vec<Vec<String>> = serde_json::from_str(rows.as_str().unwrap()).unwrap();
    let items = direct["items"].as_array().unwrap();
    if items.is_empty() {
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0][0].contains("No items could be read"), "{rows:?}");
    } else {
        let want: Vec<Vec<String>> = items
            .iter()
            .map(|i| {
                ["term", "value", "unit"]
                    .iter()
                    .map(|k| i[*k].as_str().unwrap().to_string())
                    .collect()
            })
            .collect();
        assert_eq!(rows, want);
    }
    let timings = b.eval("document.getElementById('timings').textContent");
    assert!(timings.as_str().unwrap().contains("prefill"), "{timings}");
    let png = b.call("Page.captureScreenshot", json!({"format": "png"}))["data"]
        .as_str()
        .map(|d| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(d).unwrap()
        })
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-demo.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {}", shot.display());

    // The table renders items as text, never as HTML (answers are untrusted).
    let n = b.eval(
        "renderItems({items: [{term: 'Hemoglobin', value: '13.5', unit: 'g/dL'}, {term: '<img src=x onerror=alert(1)>', value: '1', unit: ''}], parse_status: 'clean', raw_answer: '', timings: {}, tokens: {}, batch_size: 1}); document.querySelectorAll('#items tbody tr').length + ':' + document.querySelectorAll('#items img').length + ':' + document.querySelector('#items tbody tr td').textContent",
    );
    assert_eq!(n, "2:0:Hemoglobin");

    // The analyze tab sends the edited prompt; the model card says there is no workspace.
    b.eval("document.getElementById('tab-analyze').click(); document.getElementById('a-prompt').value = 'Name one value.'; document.getElementById('a-run').click(); true");
    b.wait_for(
        "document.getElementById('a-status').textContent === 'Answer'",
        Duration::from_secs(120),
    );
    b.eval("document.getElementById('tab-card').click(); true");
    b.wait_for(
        "document.getElementById('card-body').textContent.includes('No workspace report')",
        Duration::from_secs(30),
    );
}
