//! Configs checked once, where they enter: [`Checked`] is a config whose
//! [`Validate::validate`] passed, and every constructor of the library
//! takes `impl IntoChecked<Config>`, so that a config a user passes is
//! checked there and a checked one goes through as it is. A model checks
//! its config once and hands its layers the sub-configs it derives from it
//! ([`Checked::derived`]), whose checks its own covers: an 8-layer decoder
//! checks its router's settings once, not once per layer and again in
//! each router and bank.

use crate::Result;

/// A config that can check itself: every value and every relation
/// between values that its layer needs, the error naming the field and
/// what was expected.
pub trait Validate {
    /// Checks the config.
    fn validate(&self) -> Result<()>;
}

/// A config that passed its check ([`Checked::new`]), or that was derived
/// from one whose check covers it ([`Checked::derived`]). It reads as the
/// config (`Deref`); changing it takes [`Checked::into_inner`] and a new
/// check.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<C>(C);

impl<C: Validate> Checked<C> {
    /// Checks `config`.
    pub fn new(config: C) -> Result<Self> {
        config.validate()?;
        Ok(Checked(config))
    }
}

impl<C> Checked<C> {
    /// A config derived from a checked one whose check covers every value
    /// of it (a decoder's MoE layer from the decoder's config, whose check
    /// checks that layer's): taken without another check.
    pub fn derived(config: C) -> Self {
        Checked(config)
    }

    /// The config, to change (and check again).
    pub fn into_inner(self) -> C {
        self.0
    }
}

impl<C> std::ops::Deref for Checked<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.0
    }
}

/// What a constructor takes: a config (checked there) or a [`Checked`]
/// one (taken as it is), owned or borrowed.
pub trait IntoChecked<C> {
    /// The checked config.
    fn into_checked(self) -> Result<Checked<C>>;
}

impl<C: Validate> IntoChecked<C> for C {
    fn into_checked(self) -> Result<Checked<C>> {
        Checked::new(self)
    }
}

impl<C: Validate + Clone> IntoChecked<C> for &C {
    fn into_checked(self) -> Result<Checked<C>> {
        Checked::new(self.clone())
    }
}

impl<C> IntoChecked<C> for Checked<C> {
    fn into_checked(self) -> Result<Checked<C>> {
        Ok(self)
    }
}

impl<C: Clone> IntoChecked<C> for &Checked<C> {
    fn into_checked(self) -> Result<Checked<C>> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MoeError;
    use std::cell::Cell;

    thread_local! {
        static CHECKS: Cell<u32> = const { Cell::new(0) };
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Width(i64);

    impl Validate for Width {
        fn validate(&self) -> Result<()> {
            CHECKS.with(|n| n.set(n.get() + 1));
            match self.0 > 0 {
                true => Ok(()),
                false => Err(MoeError::config(format!(
                    "width must be > 0, got {}",
                    self.0
                ))),
            }
        }
    }

    fn layer(config: impl IntoChecked<Width>) -> Result<i64> {
        Ok(config.into_checked()?.into_inner().0)
    }

    #[test]
    // The borrowed configs are what is tested.
    #[allow(clippy::needless_borrows_for_generic_args)]
    fn a_config_is_checked_where_it_enters_and_not_again() {
        let before = CHECKS.with(Cell::get);
        assert_eq!(layer(Width(3)).unwrap(), 3);
        assert_eq!(layer(&Width(4)).unwrap(), 4);
        assert_eq!(CHECKS.with(Cell::get), before + 2);
        let checked = Checked::new(Width(5)).unwrap();
        assert_eq!(layer(&checked).unwrap(), 5);
        assert_eq!(layer(checked).unwrap(), 5);
        assert_eq!(
            CHECKS.with(Cell::get),
            before + 3,
            "a checked config is not checked again"
        );
        let err = layer(Width(0)).unwrap_err().to_string();
        assert!(err.contains("width must be > 0, got 0"), "{err}");
    }
}
