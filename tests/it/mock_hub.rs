//! A mock Hugging Face Hub on 127.0.0.1 (random port) for offline tests: a small
//! `std::net::TcpListener` HTTP/1.1 server with the endpoints and headers the `hf-hub` crate
//! uses (huggingface/hf-hub src/api/sync.rs; the hub's behaviour as huggingface_hub's
//! file_download.py expects it):
//!
//! - `GET /api/{models|datasets}/{id}/revision/{rev}?blobs=true`: `{sha, siblings: [{rfilename,
//!   size, blobId, lfs: {sha256, size}}]}`;
//! - `GET /[datasets/]{id}/resolve/{rev}/{file}`: small files served directly with `ETag`
//!   (the blob id) and `X-Repo-Commit`; LFS files answered with a 302 to `/lfs/{sha256}` plus
//!   `X-Linked-Etag`, `X-Linked-Size` and `X-Repo-Commit`;
//! - `Range: bytes=a-b` / `bytes=a-` answered with 206 and `Content-Range`;
//! - errors with the hub's `X-Error-Code` (`RepoNotFound`, `GatedRepo`, `EntryNotFound`,
//!   `RevisionNotFound`).
//!
//! Faults for tests: a connection dropped mid-file (once), and a file served with content that
//! does not match its advertised sha256. The server stops after [`MAX_REQUESTS`] requests,
//! [`MAX_LIFETIME`], or when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Requests served before the server stops on its own.
pub const MAX_REQUESTS: usize = 500;
/// How long the server lives at most.
pub const MAX_LIFETIME: Duration = Duration::from_secs(120);

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// One file of a mock repository.
#[derive(Clone)]
pub struct MockFile {
    pub path: String,
    pub content: Vec<u8>,
    /// Stored in LFS: advertised with its sha256 and served through a redirect.
    pub lfs: bool,
    /// Bytes actually served instead of `content` (a corrupt upload).
    pub served: Option<Vec<u8>>,
}

impl MockFile {
    pub fn new(path: &str, content: Vec<u8>, lfs: bool) -> Self {
        Self {
            path: path.into(),
            content,
            lfs,
            served: None,
        }
    }
    /// The git blob id stand-in (the hub sends the git sha1; any 40-hex id works for the client).
    pub fn blob_id(&self) -> String {
        sha256_hex(&self.content)[..40].to_string()
    }
    pub fn sha256(&self) -> String {
        sha256_hex(&self.content)
    }
    fn body(&self) -> &[u8] {
        self.served.as_deref().unwrap_or(&self.content)
    }
}

/// A mock repository.
#[derive(Clone)]
pub struct MockRepo {
    /// `models` or `datasets`.
    pub kind: &'static str,
    pub id: String,
    pub commit: String,
    pub files: Vec<MockFile>,
    /// Requires an `Authorization: Bearer …` header (a gated repository).
    pub gated: bool,
}

/// A served request, for assertions.
#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct State {
    repos: Vec<MockRepo>,
    /// (path inside the repo, bytes to send before closing): drop the first full transfer.
    drop_once: Mutex<Option<(String, usize)>>,
    log: Mutex<Vec<Logged>>,
    base: String,
}

pub struct MockHub {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl MockHub {
    /// Starts serving `repos`; `drop_once` makes the first non-probe transfer of that file
    /// close after that many bytes.
    pub fn start(repos: Vec<MockRepo>, drop_once: Option<(&str, usize)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a local port");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            repos,
            drop_once: Mutex::new(drop_once.map(|(p, n)| (p.to_string(), n))),
            log: Mutex::new(Vec::new()),
            base: format!("http://{addr}"),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut served = 0;
            while !sp.load(Ordering::Relaxed)
                && start.elapsed() < MAX_LIFETIME
                && served < MAX_REQUESTS
            {
                match listener.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        let _ = handle(stream, &st);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn handle(mut s: TcpStream, st: &State) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let range = header("range");
    let auth = header("authorization");
    st.log.lock().unwrap().push(Logged {
        path: target.clone(),
        range: range.clone(),
        authorization: auth.clone(),
    });
    let path = target.split('?').next().unwrap_or("").to_string();

    if let Some(rest) = path.strip_prefix("/api/") {
        let (kind, rest) = rest.split_once('/').unwrap_or(("", ""));
        let (id, rev) = rest.split_once("/revision/").unwrap_or((rest, "main"));
        let Some(repo) = find(st, kind, id) else {
            return error(s, 404, "RepoNotFound", "Repository not found");
        };
        if repo.gated && auth.is_none() {
            return error(s, 401, "GatedRepo", "Access to this model is restricted");
        }
        if rev != "main" && rev != repo.commit {
            return error(s, 404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({
                    "rfilename": f.path, "size": f.content.len(), "blobId": f.blob_id(),
                });
                if f.lfs {
                    v["lfs"] = serde_json::json!({
                        "sha256": f.sha256(), "size": f.content.len(), "pointerSize": 134,
                    });
                }
                v
            })
            .collect();
        let body = serde_json::json!({"id": repo.id, "sha": repo.commit, "siblings": siblings});
        return respond(
            s,
            200,
            &[("Content-Type", "application/json".into())],
            body.to_string().as_bytes(),
        );
    }
    if let Some(sha) = path.strip_prefix("/lfs/") {
        let file = st
            .repos
            .iter()
            .flat_map(|r| &r.files)
            .find(|f| f.lfs && f.sha256() == sha);
        return match file {
            Some(f) => serve(s, st, f, range.as_deref(), &[]),
            None => error(s, 404, "EntryNotFound", "no such object"),
        };
    }
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("datasets", r),
        None => ("models", path.trim_start_matches('/')),
    };
    let Some((id, after)) = rest.split_once("/resolve/") else {
        return error(s, 404, "", "not found");
    };
    let Some(repo) = find(st, kind, id) else {
        return error(s, 404, "RepoNotFound", "Repository not found");
    };
    if repo.gated && auth.is_none() {
        return error(s, 401, "GatedRepo", "Access to this model is restricted");
    }
    let (rev, file) = after.split_once('/').unwrap_or((after, ""));
    if rev != "main" && rev != repo.commit {
        return error(s, 404, "RevisionNotFound", "Invalid rev id");
    }
    let Some(f) = repo.files.iter().find(|f| f.path == file) else {
        return error(s, 404, "EntryNotFound", "Entry not found");
    };
    let commit = ("X-Repo-Commit", repo.commit.clone());
    if f.lfs {
        return respond(
            s,
            302,
            &[
                ("Location", format!("{}/lfs/{}", st.base, f.sha256())),
                ("X-Linked-Etag", format!("\"{}\"", f.sha256())),
                ("X-Linked-Size", f.content.len().to_string()),
                ("ETag", format!("\"{}\"", f.blob_id())),
                commit,
            ],
            b"",
        );
    }
    serve(
        s,
        st,
        f,
        range.as_deref(),
        &[("ETag", format!("\"{}\"", f.blob_id())), commit],
    )
}

fn find<'a>(st: &'a State, kind: &str, id: &str) -> Option<&'a MockRepo> {
    st.repos.iter().find(|r| r.kind == kind && r.id == id)
}

/// Serves a file's bytes, honouring `Range`, maybe dropping the connection mid-way.
fn serve(
    mut s: TcpStream,
    st: &State,
    f: &MockFile,
    range: Option<&str>,
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let body = f.body();
    let total = body.len();
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(total).min(total);
            if a >= total {
                return respond(
                    s,
                    416,
                    &[("Content-Range", format!("bytes */{total}"))],
                    b"",
                );
            }
            (a, b)
        }
        None => (0, total),
    };
    let mut headers: Vec<(&str, String)> = extra.to_vec();
    let status = if range.is_some() {
        headers.push((
            "Content-Range",
            format!("bytes {start}-{}/{total}", end - 1),
        ));
        206
    } else {
        200
    };
    let slice = &body[start..end];
    let mut drop_once = st.drop_once.lock().unwrap();
    if let Some((p, n)) = drop_once.clone() {
        if p == f.path && slice.len() > 1 {
            *drop_once = None;
            drop(drop_once);
            write_head(&mut s, status, &headers, slice.len())?;
            s.write_all(&slice[..n.min(slice.len())])?;
            s.flush()?;
            return s.shutdown(std::net::Shutdown::Both);
        }
    }
    drop(drop_once);
    respond(s, status, &headers, slice)
}

fn error(s: TcpStream, status: u16, code: &str, message: &str) -> std::io::Result<()> {
    let mut h = vec![("Content-Type", "application/json".to_string())];
    if !code.is_empty() {
        h.push(("X-Error-Code", code.to_string()));
        h.push(("X-Error-Message", message.to_string()));
    }
    respond(
        s,
        status,
        &h,
        serde_json::json!({ "error": message })
            .to_string()
            .as_bytes(),
    )
}

fn write_head(
    s: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    len: usize,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
}

fn respond(
    mut s: TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(&mut s, status, headers, body.len())?;
    s.write_all(body)?;
    s.flush()
}
