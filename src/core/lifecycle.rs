//! A shard's life as one explicit state.

/// A shard's life: it serves, then drains (forced: finish now), then has
/// handed its players over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    Draining { forced: bool },
    Drained,
}

impl Lifecycle {
    /// A drain asked for (forced or not): the next state, and whether this
    /// began the drain. A drain only moves forward.
    pub fn drain(self, force: bool) -> (Lifecycle, bool) {
        match self {
            Lifecycle::Running => (Lifecycle::Draining { forced: force }, true),
            Lifecycle::Draining { forced } => (
                Lifecycle::Draining {
                    forced: forced || force,
                },
                false,
            ),
            Lifecycle::Drained => (Lifecycle::Drained, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lifecycle;

    #[test]
    fn a_drain_only_moves_forward() {
        let (d, began) = Lifecycle::Running.drain(false);
        assert_eq!((d, began), (Lifecycle::Draining { forced: false }, true));
        let (f, began) = d.drain(true);
        assert_eq!((f, began), (Lifecycle::Draining { forced: true }, false));
        assert_eq!(f.drain(false).0, f, "a forced drain stays forced");
        assert_eq!(
            Lifecycle::Running.drain(true),
            (Lifecycle::Draining { forced: true }, true)
        );
        assert_eq!(Lifecycle::Drained.drain(true), (Lifecycle::Drained, false));
    }
}
