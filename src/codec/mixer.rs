//! Online mixing of K probability distributions: p = Σ w_i q_i, with w = softmax(θ) per
//! weight set. θ follows an exponentiated-gradient (Hedge) update,
//! θ_j += η · ln(q_j(y) / p(y)): a Bayesian mixture when η = 1. Unlike the plain softmax
//! gradient w_j (q_j/p − 1) it does not vanish for a component whose weight is small, so a
//! chunk of a few thousand tokens is enough to learn that the match model is right.
//! Weight sets are selected by a small context so confidence is learned per situation.

const Q_FLOOR: f64 = 1e-4;
const THETA_LIMIT: f64 = 20.0;

pub struct Mixer {
    n: usize,
    theta: Vec<f64>,
    lr: f64,
}

impl Mixer {
    pub fn new(n_inputs: usize, n_sets: usize, lr: f32, first_init: f32) -> Mixer {
        let mut theta = vec![0.0; n_inputs * n_sets];
        for set in 0..n_sets {
            theta[set * n_inputs] = first_init as f64;
        }
        Mixer {
            n: n_inputs,
            theta,
            lr: lr as f64,
        }
    }

    /// Weights of one set (softmax of θ, pinned `exp`).
    pub fn weights(&self, set: usize, out: &mut [f64]) {
        let th = &self.theta[set * self.n..(set + 1) * self.n];
        let max = th.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for (o, &t) in out.iter_mut().zip(th) {
            *o = libm::exp(t - max);
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }

    /// `q_y[i]` is input i's probability of the coded symbol, `p_y` the mixture's.
    pub fn update(&mut self, set: usize, q_y: &[f64], p_y: f64) {
        let th = &mut self.theta[set * self.n..(set + 1) * self.n];
        for (t, &q) in th.iter_mut().zip(q_y) {
            // A floor keeps one miss of a sparse component from silencing it for good.
            let g = libm::log(q.max(Q_FLOOR) / p_y);
            *t = (*t + self.lr * g).clamp(-THETA_LIMIT, THETA_LIMIT);
        }
    }
}
