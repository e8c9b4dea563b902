//! Envoy's `FractionalPercent`: the share of requests a fault or a mirror applies to.

use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use rand::Rng;

/// `numerator / denominator`, with a numerator above the denominator meaning all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    numerator: u32,
    denominator: u32,
}

impl Fraction {
    /// Every request.
    pub const ALL: Fraction = Fraction {
        numerator: 1,
        denominator: 1,
    };

    /// The fraction given; none given is Envoy's default for faults and mirrors: all.
    pub fn of(p: Option<&FractionalPercent>) -> Fraction {
        let Some(p) = p else { return Fraction::ALL };
        let denominator = match DenominatorType::try_from(p.denominator) {
            Ok(DenominatorType::TenThousand) => 10_000,
            Ok(DenominatorType::Million) => 1_000_000,
            // An unknown denominator is read as Envoy's default, HUNDRED.
            _ => 100,
        };
        Fraction {
            numerator: p.numerator.min(denominator),
            denominator,
        }
    }

    /// Draws whether this request is in the fraction.
    pub fn sample(self) -> bool {
        self.numerator > 0 && rand::rng().random_range(0..self.denominator) < self.numerator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denominators_and_bounds() {
        let p = |numerator, d: DenominatorType| FractionalPercent {
            numerator,
            denominator: d as i32,
        };
        assert!(!Fraction::of(Some(&p(0, DenominatorType::Hundred))).sample());
        assert!(Fraction::of(Some(&p(100, DenominatorType::Hundred))).sample());
        assert!(
            Fraction::of(Some(&p(5000, DenominatorType::Hundred))).sample(),
            "above 100% is all"
        );
        assert!(Fraction::of(None).sample());
        let quarter = Fraction::of(Some(&p(2500, DenominatorType::TenThousand)));
        let hits = (0..20_000).filter(|_| quarter.sample()).count();
        // 25% of 20 000 is 5 000 with σ ≈ 61: six σ either side.
        assert!((4_630..=5_370).contains(&hits), "{hits}");
    }
}
