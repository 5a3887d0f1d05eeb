//! Dedicated worker threads fed through one bounded queue: CPU-bound generations never run on
//! the async executor, and a full queue is refused at once instead of growing.

use std::sync::{
    Arc, Mutex, PoisonError,
    mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
};

use crate::error::{Error, Result};

pub struct Pool<J> {
    queue: SyncSender<J>,
}

impl<J: Send + 'static> Pool<J> {
    /// One thread per worker; each takes the next job when it is free. Up to `queue` jobs
    /// wait for a worker.
    pub fn start<W>(name: &str, workers: Vec<W>, queue: usize) -> Self
    where
        W: FnMut(J) + Send + 'static,
    {
        let (sender, receiver) = sync_channel::<J>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for (index, mut work) in workers.into_iter().enumerate() {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    while let Some(job) = next_job(&receiver) {
                        // A panicking generation loses its own answer, not the worker.
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(job)))
                            .is_err()
                        {
                            tracing::error!("a local generation panicked; its request failed");
                        }
                    }
                })
                .expect("the OS starts a worker thread");
        }
        Pool { queue: sender }
    }

    /// Queues `job`, or refuses it when the queue is full.
    pub fn submit(&self, job: J) -> Result<()> {
        self.queue.try_send(job).map_err(|err| match err {
            TrySendError::Full(_) => Error::Throttled(
                "the local model is busy and its queue is full: retry later".into(),
            ),
            TrySendError::Disconnected(_) => {
                Error::Upstream("the local model's workers have stopped".into())
            }
        })
    }
}

fn next_job<J>(receiver: &Mutex<Receiver<J>>) -> Option<J> {
    receiver
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .recv()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Sender, channel};

    /// A job that reports when it starts and then waits until the test lets it finish.
    struct Hold {
        started: Sender<()>,
        finish: Receiver<()>,
    }

    fn hold() -> (Hold, Receiver<()>, Sender<()>) {
        let (started, started_rx) = channel();
        let (finish_tx, finish) = channel();
        (Hold { started, finish }, started_rx, finish_tx)
    }

    fn run(job: Hold) {
        job.started.send(()).unwrap();
        let _ = job.finish.recv();
    }

    #[test]
    fn a_full_queue_is_throttled_and_frees_up_when_a_worker_does() {
        let pool = Pool::start("test", vec![run], 1);
        let (running, running_started, finish_running) = hold();
        pool.submit(running).unwrap();
        running_started.recv().unwrap();
        let (queued, queued_started, _finish_queued) = hold();
        pool.submit(queued).unwrap();
        let (refused, _, _) = hold();
        let err = pool.submit(refused).unwrap_err();
        assert_eq!(err.code(), "throttled");
        assert_eq!(err.retry_after(), Some(2));
        finish_running.send(()).unwrap();
        queued_started.recv().unwrap();
        let (next, _, _) = hold();
        pool.submit(next).unwrap();
    }

    #[test]
    fn a_panicking_job_does_not_take_its_worker_down() {
        let pool = Pool::start(
            "test",
            vec![|job: Option<Sender<()>>| job.unwrap().send(()).unwrap()],
            2,
        );
        pool.submit(None).unwrap();
        let (done, done_rx) = channel();
        pool.submit(Some(done)).unwrap();
        done_rx.recv().unwrap();
    }
}
