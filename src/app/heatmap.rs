//! Heatmaps over images, drawn by our WGSL shader (shaders/heatmap.wgsl) through an egui-wgpu
//! paint callback. The pipeline, a small uniform buffer and a value texture are built once
//! from the renderer's state and kept in its callback resources; each frame `prepare` writes
//! the grid of values and the parameters, `paint` draws one quad over the image rectangle.

use eframe::egui;
use eframe::egui_wgpu::{self, wgpu};

use crate::colormap::{Colormap, HEATMAP_WGSL};

/// Largest grid the value texture holds (ViT-L/14 at 336 px has 24 x 24 patches).
pub const MAX_GRID: u32 = 64;

/// What one heatmap draws.
#[derive(Debug, Clone)]
pub struct HeatmapParams {
    pub grid: usize,
    /// `grid * grid` values, row-major.
    pub values: Vec<f32>,
    pub vmin: f32,
    pub vmax: f32,
    pub opacity: f32,
    pub smooth: bool,
    pub colormap: Colormap,
    /// Patch indices to outline (at most 8).
    pub outlined: Vec<usize>,
}

struct Resources {
    pipeline: wgpu::RenderPipeline,
    bind_group: wgpu::BindGroup,
    uniforms: wgpu::Buffer,
    texture: wgpu::Texture,
}

/// Build the pipeline once; call from the app's creation with `cc.wgpu_render_state`.
pub fn install(rs: &egui_wgpu::RenderState) {
    let device = &rs.device;
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("heatmap.wgsl"),
        source: wgpu::ShaderSource::Wgsl(HEATMAP_WGSL.into()),
    });
    let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("heatmap"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
            wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Float { filterable: false },
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
                count: None,
            },
        ],
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("heatmap"),
        bind_group_layouts: &[Some(&bgl)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("heatmap"),
        layout: Some(&layout),
        vertex: wgpu::VertexState {
            module: &shader,
            entry_point: Some("vs_main"),
            buffers: &[],
            compilation_options: Default::default(),
        },
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        fragment: Some(wgpu::FragmentState {
            module: &shader,
            entry_point: Some("fs_main"),
            targets: &[Some(wgpu::ColorTargetState {
                format: rs.target_format,
                blend: Some(wgpu::BlendState::PREMULTIPLIED_ALPHA_BLENDING),
                write_mask: wgpu::ColorWrites::ALL,
            })],
            compilation_options: Default::default(),
        }),
        multiview_mask: None,
        cache: None,
    });
    let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("heatmap params"),
        size: 64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: Some("heatmap values"),
        size: wgpu::Extent3d {
            width: MAX_GRID,
            height: MAX_GRID,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::R32Float,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("heatmap"),
        layout: &bgl,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: uniforms.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::TextureView(&view),
            },
        ],
    });
    rs.renderer.write().callback_resources.insert(Resources {
        pipeline,
        bind_group,
        uniforms,
        texture,
    });
}

/// The uniform block of the shader (`Params`, 64 bytes, std140-compatible layout).
pub fn uniform_bytes(p: &HeatmapParams) -> [u8; 64] {
    let mut b = [0u8; 64];
    let mut put = |off: usize, v: [u8; 4]| b[off..off + 4].copy_from_slice(&v);
    let g = p.grid as u32;
    put(0, g.to_le_bytes());
    put(4, g.to_le_bytes());
    put(8, p.colormap.index().to_le_bytes());
    put(12, (p.smooth as u32).to_le_bytes());
    put(16, p.vmin.to_le_bytes());
    put(20, p.vmax.to_le_bytes());
    put(24, p.opacity.to_le_bytes());
    let n = p.outlined.len().min(8);
    put(28, (n as u32).to_le_bytes());
    for (k, &idx) in p.outlined.iter().take(8).enumerate() {
        put(32 + 4 * k, (idx as u32).to_le_bytes());
    }
    b
}

struct Callback(HeatmapParams);

impl egui_wgpu::CallbackTrait for Callback {
    fn prepare(
        &self,
        _device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(r) = resources.get::<Resources>() else {
            return Vec::new();
        };
        let g = (self.0.grid as u32).min(MAX_GRID);
        if g == 0 || self.0.values.len() < (g * g) as usize {
            return Vec::new();
        }
        queue.write_buffer(&r.uniforms, 0, &uniform_bytes(&self.0));
        let bytes: Vec<u8> = self.0.values[..(g * g) as usize]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        queue.write_texture(
            wgpu::TexelCopyTextureInfo {
                texture: &r.texture,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            &bytes,
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(4 * g),
                rows_per_image: Some(g),
            },
            wgpu::Extent3d {
                width: g,
                height: g,
                depth_or_array_layers: 1,
            },
        );
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(r) = resources.get::<Resources>() else {
            return;
        };
        pass.set_pipeline(&r.pipeline);
        pass.set_bind_group(0, &r.bind_group, &[]);
        pass.draw(0..6, 0..1);
    }
}

/// Draw the heatmap over `rect` (one per frame: the value texture is shared).
pub fn paint(ui: &egui::Ui, rect: egui::Rect, params: HeatmapParams) {
    ui.painter().add(egui_wgpu::Callback::new_paint_callback(
        rect,
        Callback(params),
    ));
}

/// A horizontal legend bar for `colormap` from `vmin` to `vmax` (drawn with egui meshes).
pub fn legend_ui(ui: &mut egui::Ui, colormap: Colormap, vmin: f32, vmax: f32, label: &str) {
    ui.horizontal(|ui| {
        ui.label(format!("{vmin:.3}"));
        let (rect, _) = ui.allocate_exact_size(egui::vec2(160.0, 12.0), egui::Sense::hover());
        let steps = 32;
        for k in 0..steps {
            let t = k as f32 / (steps - 1) as f32;
            let [r, g, b] = colormap.sample_u8(t);
            let x0 = rect.left() + rect.width() * k as f32 / steps as f32;
            let x1 = rect.left() + rect.width() * (k + 1) as f32 / steps as f32;
            ui.painter().rect_filled(
                egui::Rect::from_x_y_ranges(x0..=x1, rect.y_range()),
                0.0,
                egui::Color32::from_rgb(r, g, b),
            );
        }
        ui.label(format!("{vmax:.3}"));
        ui.weak(label);
    });
}
