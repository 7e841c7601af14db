// Heatmap overlay of the explorer: a grid of values (one per image patch) drawn over the
// image rectangle that egui gives the paint callback, through a colormap, with an opacity,
// either per patch (nearest) or smooth (bilinear between patch centres). Outlined patches
// (the CLS token's top-5 for the semantic loss) get a white border.
//
// The colormap stops are the same numbers as src/colormap.rs (a test checks it).

struct Params {
    grid: vec2<u32>,
    colormap: u32,
    smooth_on: u32,
    vmin: f32,
    vmax: f32,
    opacity: f32,
    outline_count: u32,
    outlined: array<vec4<u32>, 2>,
};

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var values: texture_2d<f32>;

struct VsOut {
    @builtin(position) pos: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

@vertex
fn vs_main(@builtin(vertex_index) i: u32) -> VsOut {
    var corners = array<vec2<f32>, 6>(
        vec2<f32>(-1.0, -1.0), vec2<f32>(1.0, -1.0), vec2<f32>(-1.0, 1.0),
        vec2<f32>(-1.0, 1.0), vec2<f32>(1.0, -1.0), vec2<f32>(1.0, 1.0),
    );
    let xy = corners[i];
    var out: VsOut;
    out.pos = vec4<f32>(xy, 0.0, 1.0);
    out.uv = vec2<f32>((xy.x + 1.0) * 0.5, (1.0 - xy.y) * 0.5);
    return out;
}

const VIRIDIS = array<vec3<f32>, 5>(vec3<f32>(0.267, 0.005, 0.329), vec3<f32>(0.229, 0.322, 0.546), vec3<f32>(0.128, 0.567, 0.551), vec3<f32>(0.369, 0.789, 0.383), vec3<f32>(0.993, 0.906, 0.144));
const MAGMA = array<vec3<f32>, 5>(vec3<f32>(0.001, 0.000, 0.014), vec3<f32>(0.317, 0.071, 0.485), vec3<f32>(0.716, 0.215, 0.475), vec3<f32>(0.987, 0.536, 0.382), vec3<f32>(0.987, 0.991, 0.750));
const COOLWARM = array<vec3<f32>, 5>(vec3<f32>(0.230, 0.299, 0.754), vec3<f32>(0.552, 0.690, 0.996), vec3<f32>(0.866, 0.866, 0.866), vec3<f32>(0.958, 0.604, 0.482), vec3<f32>(0.706, 0.016, 0.150));

fn stop(map: u32, i: u32) -> vec3<f32> {
    var v = VIRIDIS;
    var m = MAGMA;
    var c = COOLWARM;
    switch map {
        case 0u: { return v[i]; }
        case 1u: { return m[i]; }
        case 2u: { return c[i]; }
        default: { return v[i]; }
    }
}

fn colormap(t: f32, map: u32) -> vec3<f32> {
    let x = clamp(t, 0.0, 1.0) * 4.0;
    let i = min(u32(floor(x)), 3u);
    let f = x - f32(i);
    return mix(stop(map, i), stop(map, i + 1u), f);
}

fn cell(x: i32, y: i32) -> f32 {
    let g = vec2<i32>(params.grid);
    let c = clamp(vec2<i32>(x, y), vec2<i32>(0, 0), g - vec2<i32>(1, 1));
    return textureLoad(values, c, 0).r;
}

fn is_outlined(idx: u32) -> bool {
    for (var k = 0u; k < params.outline_count; k = k + 1u) {
        if (params.outlined[k / 4u][k % 4u] == idx) {
            return true;
        }
    }
    return false;
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let g = vec2<f32>(params.grid);
    let p = in.uv * g;
    var v: f32;
    if (params.smooth_on == 1u) {
        let q = p - vec2<f32>(0.5, 0.5);
        let i = vec2<i32>(floor(q));
        let f = q - floor(q);
        let a = mix(cell(i.x, i.y), cell(i.x + 1, i.y), f.x);
        let b = mix(cell(i.x, i.y + 1), cell(i.x + 1, i.y + 1), f.x);
        v = mix(a, b, f.y);
    } else {
        v = cell(i32(p.x), i32(p.y));
    }
    let t = (v - params.vmin) / max(params.vmax - params.vmin, 1e-12);
    var rgb = colormap(t, params.colormap);
    var a = params.opacity;
    // outline: a thin white border inside outlined patches
    let c = vec2<u32>(min(floor(p), g - vec2<f32>(1.0, 1.0)));
    let idx = c.y * params.grid.x + c.x;
    let frac = p - floor(p);
    let edge = min(min(frac.x, 1.0 - frac.x), min(frac.y, 1.0 - frac.y));
    if (is_outlined(idx) && edge < 0.08) {
        rgb = vec3<f32>(1.0, 1.0, 1.0);
        a = 1.0;
    }
    return vec4<f32>(rgb * a, a);
}
