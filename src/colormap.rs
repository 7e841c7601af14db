//! Colormaps of the explorer, in one place: the heatmap shader (shaders/heatmap.wgsl) carries
//! the same stops, and a test checks that the two agree. Stops are sampled from matplotlib's
//! viridis and magma and from the cool-warm diverging map (Moreland), at t = 0, .25, .5, .75, 1.

/// A colormap by name, as the shader's `colormap` index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum Colormap {
    #[default]
    Viridis,
    Magma,
    CoolWarm,
}

impl Colormap {
    pub const ALL: [Colormap; 3] = [Colormap::Viridis, Colormap::Magma, Colormap::CoolWarm];
    pub fn index(self) -> u32 {
        self as u32
    }
    pub fn name(self) -> &'static str {
        match self {
            Colormap::Viridis => "viridis",
            Colormap::Magma => "magma",
            Colormap::CoolWarm => "cool-warm",
        }
    }
    pub fn stops(self) -> &'static [[f32; 3]; 5] {
        match self {
            Colormap::Viridis => &VIRIDIS,
            Colormap::Magma => &MAGMA,
            Colormap::CoolWarm => &COOLWARM,
        }
    }
    /// Linear interpolation between the stops, `t` in 0..=1 -> RGB in 0..=1 (what the shader
    /// computes).
    pub fn sample(self, t: f32) -> [f32; 3] {
        let s = self.stops();
        let t = t.clamp(0.0, 1.0) * 4.0;
        let i = (t.floor() as usize).min(3);
        let f = t - i as f32;
        [0, 1, 2].map(|k| s[i][k] * (1.0 - f) + s[i + 1][k] * f)
    }
    pub fn sample_u8(self, t: f32) -> [u8; 3] {
        self.sample(t)
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
    }
}

pub const VIRIDIS: [[f32; 3]; 5] = [
    [0.267, 0.005, 0.329],
    [0.229, 0.322, 0.546],
    [0.128, 0.567, 0.551],
    [0.369, 0.789, 0.383],
    [0.993, 0.906, 0.144],
];
pub const MAGMA: [[f32; 3]; 5] = [
    [0.001, 0.000, 0.014],
    [0.317, 0.071, 0.485],
    [0.716, 0.215, 0.475],
    [0.987, 0.536, 0.382],
    [0.987, 0.991, 0.750],
];
pub const COOLWARM: [[f32; 3]; 5] = [
    [0.230, 0.299, 0.754],
    [0.552, 0.690, 0.996],
    [0.866, 0.866, 0.866],
    [0.958, 0.604, 0.482],
    [0.706, 0.016, 0.150],
];

/// The shader source, for the renderer and for the consistency test.
pub const HEATMAP_WGSL: &str = include_str!("../shaders/heatmap.wgsl");

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `const NAME = array<vec3<f32>, 5>(...)` in the shader equals the Rust stops.
    #[test]
    fn shader_colormaps_match_rust() {
        for (name, stops) in [
            ("VIRIDIS", &VIRIDIS),
            ("MAGMA", &MAGMA),
            ("COOLWARM", &COOLWARM),
        ] {
            let start = HEATMAP_WGSL
                .find(&format!("const {name}"))
                .unwrap_or_else(|| panic!("{name} missing in the shader"));
            let body = &HEATMAP_WGSL[start..];
            let body = &body[body.find("(").unwrap() + 1..body.find(");").unwrap()];
            let nums: Vec<f32> = body
                .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                .filter(|s| s.contains('.'))
                .map(|s| s.parse().unwrap())
                .collect();
            let want: Vec<f32> = stops.iter().flatten().copied().collect();
            assert_eq!(nums, want, "{name}");
        }
        // the shader's colormap indices follow the enum
        for c in Colormap::ALL {
            assert!(
                HEATMAP_WGSL.contains(&format!("case {}u", c.index())),
                "{c:?}"
            );
        }
    }

    #[test]
    fn sampling_hits_the_stops() {
        assert_eq!(Colormap::Viridis.sample(0.0), VIRIDIS[0]);
        assert_eq!(Colormap::Magma.sample(1.0), MAGMA[4]);
        let mid = Colormap::CoolWarm.sample(0.125);
        assert!((mid[0] - (COOLWARM[0][0] + COOLWARM[1][0]) / 2.0).abs() < 1e-6);
    }
}

#[cfg(test)]
mod shader_tests {
    /// The shader parses and validates (naga, the same front end wgpu uses), so a WGSL mistake
    /// fails here rather than when the window opens.
    #[test]
    fn heatmap_shader_validates() {
        let module = naga::front::wgsl::parse_str(super::HEATMAP_WGSL)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(super::HEATMAP_WGSL)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(module.entry_points.iter().any(|e| e.name == "vs_main"));
        assert!(module.entry_points.iter().any(|e| e.name == "fs_main"));
    }
}
