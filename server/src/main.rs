//! `dormouse-server`: E2B's sandbox API over dormouse, so the official E2B
//! SDKs work against a self-hosted machine unchanged:
//!
//! ```text
//! DORMOUSE_API_KEYS=e2b_0123... dormouse-server --listen 127.0.0.1:3000 --state-dir /var/lib/dormouse
//! ```
//!
//! One listener serves both planes. Requests carrying `E2b-Sandbox-Id`
//! (what the SDK sends to its `sandbox_url`), or whose `Host` is
//! `{port}-{id}.{domain}`, go to that sandbox: port 49983 is envd (files,
//! processes, filesystem), 49999 the code interpreter, any other port the
//! guest's own server. Everything else is the control plane (`/sandboxes`).

mod api;
mod config;
mod connect;
mod envd;
mod error;
mod interpreter;
mod proxy;
mod routing;
mod state;

use std::sync::Arc;
use std::time::Duration;

use config::{Config, OnShutdown};
use state::{AppState, Keys};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match Config::from_args(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            print!("{}", config::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("dormouse-server: {e}\n\n{}", config::USAGE);
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("dormouse-server: cannot start the async runtime: {e}");
            std::process::exit(1);
        });
    if let Err(e) = runtime.block_on(serve(config)) {
        eprintln!("dormouse-server: {e}");
        std::process::exit(1);
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let mut builder = dormouse::Runtime::builder(&config.state_dir);
    if let Some(dir) = &config.template_dir {
        builder = builder.template_dir(dir);
    }
    let rt = builder.open().await.map_err(|e| {
        format!(
            "cannot open the state directory {}: {e}",
            config.state_dir.display()
        )
    })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let domain = config
        .domain
        .clone()
        .unwrap_or_else(|| format!("localhost:{}", local.port()));
    let st = Arc::new(AppState::new(
        rt,
        Keys::new(&config.keys),
        domain,
        config.aliases.clone(),
    ));
    // Boot what the templates need once, before saying ready, so no
    // client's create waits a boot.
    let prepare = config.prepare.clone();
    let st2 = st.clone();
    tokio::spawn(async move {
        for template in &prepare {
            log::info!("preparing template {template} (the first time boots it once)");
            if let Err(e) = st2.rt.prepare(template).await {
                let why = format!("template {template} cannot be prepared: {e}");
                log::error!("{why}");
                st2.set_readiness(Err(why));
                return;
            }
        }
        log::info!("ready");
        st2.set_readiness(Ok(()));
    });
    log::info!(
        "listening on {local} (state {}, {} API keys)",
        config.state_dir.display(),
        config.keys.len()
    );
    let reaper = {
        let st = st.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                st.reap();
            }
        })
    };
    let app = routing::app(st.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown_signal().await;
    log::info!(
        "stopping: {} the running sandboxes",
        match config.on_shutdown {
            OnShutdown::Pause => "pausing",
            OnShutdown::Kill => "killing",
        }
    );
    reaper.abort();
    stop_sandboxes(&st, config.on_shutdown).await;
    let _ = stop_tx.send(());
    // Streams (a command's output, a watch) end with their sandbox; give
    // the rest a moment, then go.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Pauses (or kills) every sandbox this server runs, concurrently, so a
/// restart loses nothing.
async fn stop_sandboxes(st: &Arc<AppState>, how: OnShutdown) {
    let mut tasks = tokio::task::JoinSet::new();
    for id in st.running_ids() {
        let st = st.clone();
        tasks.spawn(async move {
            let _transition = st.transition(&id).await;
            let result = match how {
                OnShutdown::Pause => st.rt.pause(&id).await,
                OnShutdown::Kill => st.rt.kill(&id).await,
            };
            st.remove(&id);
            match result {
                Ok(()) => log::info!("sandbox {id}: stopped"),
                // Paused or killed already (its timeout ran out).
                Err(dormouse::Error::AlreadyPaused { .. } | dormouse::Error::NotFound { .. }) => {}
                Err(e) => log::error!("sandbox {id}: cannot stop it: {e}"),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
