//! `sbx.run_code(...)`: a persistent Python interpreter in the guest.

use tokio::sync::mpsc;

use crate::agent::code::{self as wire, CodeOutput, CodeRun};
use crate::error::{Error, Result};
use crate::proto::ContextInfo;
use crate::sandbox::{Running, Sandbox};

pub use crate::agent::code::Execution;

impl Sandbox<Running> {
    /// Runs Python `code` in the sandbox's default interpreter context,
    /// where variables, imports and open files persist from one call to
    /// the next (started on first use).
    ///
    /// The result has what the code printed, the `repr()` of the value of
    /// its last expression (like a notebook cell's `Out[n]`), and the
    /// exception it raised, if any, with its traceback; an exception does
    /// not end the context.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// sbx.run_code("x = 41").await?;
    /// let run = sbx.run_code("print('hi'); x + 1").await?;
    /// assert_eq!((run.stdout.as_str(), run.result.as_deref()), ("hi\n", Some("42")));
    /// let run = sbx.run_code("1 / 0").await?;
    /// assert_eq!(run.error.unwrap().name, "ZeroDivisionError");
    /// # Ok(()) }
    /// ```
    pub async fn run_code(&self, code: &str) -> Result<Execution> {
        self.run_code_with(CodeRun::new(code), None).await
    }

    /// Runs code with options (context, environment variables, timeout),
    /// sending its output to `output` as it is produced when given.
    ///
    /// A run that passes its timeout is interrupted (`KeyboardInterrupt`
    /// in the code) and returns with [`Execution::timed_out`] set; the
    /// context stays usable. Dropping the future interrupts the run too.
    pub async fn run_code_with(
        &self,
        run: CodeRun,
        output: Option<mpsc::Sender<CodeOutput>>,
    ) -> Result<Execution> {
        let stream = self.connect_agent().await?;
        self.while_alive(wire::run_code(stream, &run, output))
            .await
            .map_err(|e| context_error(run.context.as_deref(), e))
    }
}

/// The interpreter contexts of a running sandbox: `sbx.code_contexts()`.
pub struct CodeContexts<'a> {
    sandbox: &'a Sandbox<Running>,
}

impl<'a> CodeContexts<'a> {
    pub(crate) fn new(sandbox: &'a Sandbox<Running>) -> Self {
        Self { sandbox }
    }

    /// Starts a new interpreter with its own variables, in `cwd` (the
    /// guest's `/root` when `None`). Pass its id to [`CodeRun::context`].
    pub async fn create(&self, cwd: Option<&str>) -> Result<ContextInfo> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox
            .while_alive(wire::create_context(stream, cwd))
            .await
    }

    /// The running interpreters.
    pub async fn list(&self) -> Result<Vec<ContextInfo>> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox.while_alive(wire::list_contexts(stream)).await
    }

    /// Stops an interpreter.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox
            .while_alive(wire::remove_context(stream, id))
            .await
            .map_err(|e| context_error(Some(id), e))
    }

    /// Replaces an interpreter by a fresh one (same id and directory, no
    /// variables).
    pub async fn restart(&self, id: &str) -> Result<ContextInfo> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox
            .while_alive(wire::restart_context(stream, id))
            .await
            .map_err(|e| context_error(Some(id), e))
    }
}

fn context_error(id: Option<&str>, e: Error) -> Error {
    match (id, e) {
        (
            Some(id),
            Error::Agent(crate::agent::AgentError::Remote {
                kind: crate::proto::ErrorKind::NotFound,
                ..
            }),
        ) => Error::ContextNotFound { id: id.to_owned() },
        (_, e) => e,
    }
}
