//! How often a lasting failure is logged: its first time, whenever its message changes, and at
//! the 2nd, 4th, 8th … time in a row, so that a fault that lasts for days is visible without
//! flooding the log (one line per interval would be 1,440 a day at a minute's interval).

/// Whether the `n`th failure in a row (counting from 1) is logged.
pub fn is_logged(n: u64) -> bool {
    n.is_power_of_two()
}

/// The failures of a worker's flushes, as logged so far.
#[derive(Default)]
pub struct FailureLog {
    /// The last message logged, until a flush succeeds.
    last: Option<String>,
}

impl FailureLog {
    /// Whether the `consecutive`th failed flush in a row, failing with `message`, is logged; if
    /// so, it is remembered as logged.
    pub fn should_log(&mut self, message: &str, consecutive: u64) -> bool {
        let changed = self.last.as_deref() != Some(message);
        let logged = changed || (consecutive > 1 && is_logged(consecutive));
        if logged {
            self.last = Some(message.to_owned());
        }
        logged
    }

    /// A flush succeeded: the next failure is news.
    pub fn succeeded(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_failure_is_logged_at_its_first_second_fourth_and_eighth_time() {
        let mut log = FailureLog::default();
        let logged: Vec<u64> = (1..=20).filter(|&n| log.should_log("table gone", n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }

    #[test]
    fn a_changed_message_is_logged_at_once_and_a_success_makes_the_next_failure_news() {
        let mut log = FailureLog::default();
        assert!(log.should_log("table gone", 1));
        assert!(!log.should_log("table gone", 3));
        assert!(log.should_log("permission denied", 5));
        assert!(!log.should_log("permission denied", 6));
        log.succeeded();
        assert!(log.should_log("permission denied", 1));
    }

    #[test]
    fn a_held_back_key_is_logged_at_its_first_second_fourth_and_eighth_failure() {
        assert_eq!((1..=10).filter(|&n| is_logged(n)).collect::<Vec<_>>(), [1, 2, 4, 8]);
    }
}
