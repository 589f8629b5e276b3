//! Online mixing of K probability distributions: p = Σ w_i q_i, with w = softmax(θ) per
//! weight set, and θ trained by gradient ascent on log p(y): ∂/∂θ_j = w_j (q_j(y)/p(y) − 1).
//! Weight sets are selected by a small context so confidence is learned per situation.

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
    pub fn update(&mut self, set: usize, weights: &[f64], q_y: &[f64], p_y: f64) {
        let th = &mut self.theta[set * self.n..(set + 1) * self.n];
        for i in 0..self.n {
            let g = weights[i] * (q_y[i] / p_y - 1.0);
            th[i] = (th[i] + self.lr * g).clamp(-30.0, 30.0);
        }
    }
}
