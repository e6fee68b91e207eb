//! The command line: classify's output and errors, bench's output line.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn classify_json_prints_one_object_per_image_and_reports_bad_files_without_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n not really").unwrap();
    let text_file = dir.path().join("notes.txt");
    std::fs::write(&text_file, b"hello").unwrap();
    let inputs = Path::new("tests/fixtures/preprocess/inputs");
    let out = run(&[
        "classify",
        "--json",
        "--top-k",
        "3",
        "--max-pixels",
        "250000",
        inputs.join("chelsea.png").to_str().unwrap(),
        "missing.png",
        corrupt.to_str().unwrap(),
        text_file.to_str().unwrap(),
        inputs.join("astronaut.jpg").to_str().unwrap(), // 512x512 = 262,144 pixels, over the limit
        inputs.join("coffee.jpg").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "bad inputs make the exit code non-zero");
    let stdout = text(&out.stdout);
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "the good images are still classified: {stdout}");
    assert!(lines[0]["file"].as_str().unwrap().ends_with("chelsea.png"));
    assert!(lines[1]["file"].as_str().unwrap().ends_with("coffee.jpg"));
    let preds = lines[0]["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    let s: Vec<f64> = preds.iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(s[0] >= s[1] && s[1] >= s[2] && s[0] <= 1.0);
    assert!(preds[0]["label"].is_string() && preds[0]["class_index"].is_u64());
    let stderr = text(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 4, "{stderr}");
    assert!(
        errors[0].contains("missing.png") && errors[0].contains("No such file"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("corrupt.png") && errors[1].contains("corrupt or truncated"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("notes.txt") && errors[2].contains("unsupported image format"),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].contains("astronaut.jpg") && errors[3].contains("over the limit"),
        "{}",
        errors[3]
    );
}

#[test]
fn classify_with_a_checkpoint_of_another_architecture_fails_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet.safetensors");
    let t = candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("conv1.weight".to_string(), t)]),
        &path,
    )
    .unwrap();
    let out = run(&[
        "classify",
        "--weights",
        path.to_str().unwrap(),
        "tests/fixtures/preprocess/inputs/chelsea.png",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: cannot load model from"), "{stderr}");
    assert!(
        stderr.contains("resnet.safetensors") && stderr.contains("not a FasterNet checkpoint"),
        "{stderr}"
    );
    let out = run(&["classify", "--variant", "t1", "tests/fixtures/preprocess/inputs/chelsea.png"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("expected [64, 3, 4, 4], checkpoint has [40, 3, 4, 4]"),
        "{}",
        text(&out.stderr)
    );
}

/// The int8 engine's calibration images: missing, or a folder without files, stop the command
/// before any image is classified, with a message naming the flag or the folder (on any CPU:
/// these are checked before the engine is built).
#[test]
fn fast_int8_without_usable_calibration_images_fails_with_one_clear_line() {
    let image = "tests/fixtures/preprocess/inputs/chelsea.png";
    let empty = tempfile::tempdir().unwrap();
    let empty = empty.path().to_str().unwrap();
    for (args, expect) in [
        (vec![], "needs calibration images (--calibration DIR"),
        (
            vec!["--calibration", "/nonexistent-calibration"],
            "calibration image /nonexistent-calibration",
        ),
        (vec!["--calibration", empty], "no calibration images"),
    ] {
        let out = run(&[&["classify", "--engine", "fast-int8"][..], &args, &[image]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.starts_with("error: cannot load model from"), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

#[test]
fn classify_reads_official_pth_checkpoints() {
    let out = run(&[
        "classify",
        "--top-k",
        "1",
        "--weights",
        "tests/fixtures/model/tiny_relu.official_model.pth",
        "tests/fixtures/preprocess/inputs/chelsea.png",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("class_"), "{}", text(&out.stdout));
}

#[test]
fn bench_prints_one_line_per_batch_size() {
    let out = run(&[
        "bench",
        "--variant",
        "t0",
        "--size",
        "64x96",
        "--batch",
        "1,2",
        "--threads",
        "1",
        "--seconds",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("batch sizes"), "no progress bar off a terminal");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, batch) in lines.iter().zip([1, 2]) {
        let prefix = format!("t0 64x96 batch {batch}: ");
        let rest = line.strip_prefix(&prefix).unwrap_or_else(|| panic!("{line}"));
        let (rate, ms) = rest.split_once(" img/s (").unwrap();
        assert!(rate.parse::<f64>().unwrap() > 0.0);
        assert!(ms.strip_suffix(" ms/batch)").unwrap().parse::<f64>().unwrap() > 0.0);
    }
}

/// `bench --profile`: after each batch size, one line per layer group in network order whose
/// times add up to no more than the pass (they are parts of it: whole images per thread at
/// batch 2, tiles shared by both threads at batch 1) and to most of it; the reference engine
/// keeps no profile and says so.
#[test]
fn bench_profile_splits_each_pass_into_its_layer_groups() {
    let args = ["bench", "--variant", "t0", "--size", "64x96", "--batch", "1,2", "--threads", "2"];
    let out = run(&[&args[..], &["--seconds", "0.3", "--profile"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let groups = [
        "stem",
        "stage 1 blocks",
        "stage 2 merge",
        "stage 2 blocks",
        "stage 3 merge",
        "stage 3 blocks",
        "stage 4 merge",
        "stage 4 blocks",
        "head (pool, 1x1 conv, classifier)",
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2 * (1 + groups.len()), "{stdout}");
    for (section, batch) in lines.chunks(1 + groups.len()).zip([1, 2]) {
        // From the rate: the ms/batch beside it is rounded to 0.1 ms, a pass here lasts about 1.
        let rate: f64 = section[0]
            .strip_prefix(&format!("t0 64x96 batch {batch}: "))
            .and_then(|rest| rest.split_once(" img/s ("))
            .unwrap_or_else(|| panic!("{stdout}"))
            .0
            .parse()
            .unwrap();
        let pass_ms = 1e3 * batch as f64 / rate;
        let mut sum = 0.0;
        for (line, group) in section[1..].iter().zip(groups) {
            let ms: f64 = line
                .trim_start()
                .strip_prefix(group)
                .and_then(|rest| rest.trim_start().split_once(" ms/batch"))
                .unwrap_or_else(|| panic!("`{group}` expected: {stdout}"))
                .0
                .parse()
                .unwrap();
            assert!(ms > 0.0, "{stdout}");
            sum += ms;
        }
        assert!(
            // Each group is printed rounded to 0.0005 ms.
            sum <= pass_ms * 1.01 + 0.0005 * groups.len() as f64 && sum >= 0.3 * pass_ms,
            "batch {batch}: layer groups add up to {sum} of {pass_ms} ms: {stdout}"
        );
    }
    let out =
        run(&[&args[..], &["--seconds", "0.1", "--profile", "--engine", "reference"]].concat());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--profile needs a fast engine"), "{}", text(&out.stderr));
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), `eval` and `bench` draw a
/// progress bar on stderr; piped, they do not (above and in bundled_accuracy.rs).
#[test]
fn eval_and_bench_show_progress_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must have util-linux's script");
        eprintln!("skipped: no `script` (util-linux) to run under a pseudo-terminal");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let image =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion_mnist_t10k_0.png");
    for (class, name) in [("0", "a"), ("0", "b"), ("9", "c")] {
        std::fs::create_dir_all(data.path().join(class)).unwrap();
        std::fs::copy(&image, data.path().join(class).join(format!("{name}.png"))).unwrap();
    }
    let binary = env!("CARGO_BIN_EXE_fasternet-serve");
    let on_terminal = |command: String| {
        let out = Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
        assert!(out.status.success(), "{command}: {}", text(&out.stdout));
        text(&out.stdout)
    };
    let eval =
        on_terminal(format!("{binary} eval --data {} --batch-size 1", data.path().display()));
    assert!(eval.contains("eval [") && eval.contains("/3 images"), "{eval}");
    assert!(eval.contains("top-1: "), "{eval}");
    let bench = on_terminal(format!(
        "{binary} bench --variant t0 --size 32 --batch 1,2 --threads 1 --seconds 0.6"
    ));
    assert!(bench.contains("batch 2 [") && bench.contains("/2 batch sizes"), "{bench}");
    assert!(bench.contains("t0 32x32 batch 2: "), "{bench}");
}

#[test]
fn every_flag_reads_its_environment_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["classify", "--json", "tests/fixtures/preprocess/inputs/chelsea.png"])
        .env("FASTERNET_TOP_K", "2")
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(v["predictions"].as_array().unwrap().len(), 2);
    let help = text(&run(&["serve", "--help"]).stdout);
    for flag in [
        "--weights",
        "--host",
        "--port",
        "--max-batch-size",
        "--max-batch-delay-ms",
        "--queue-capacity",
        "--request-timeout-ms",
        "--body-limit",
        "--max-images-per-request",
        "--max-pixels",
        "--default-top-k",
        "--threads",
        "--log-format",
        "--shutdown-grace-seconds",
    ] {
        let env =
            format!("FASTERNET_{}", flag.trim_start_matches("--").replace('-', "_").to_uppercase());
        assert!(
            help.contains(flag) && help.contains(&format!("[env: {env}")),
            "{flag} / {env} missing from serve --help"
        );
    }
}

#[test]
fn engines_agree_and_random_init_serves_imagenet_labels() {
    let image = "tests/fixtures/preprocess/inputs/chelsea.png";
    let top = |args: &[&str]| -> serde_json::Value {
        let out = run(&[&["classify", "--json", "--top-k", "3"], args, &[image]].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap()
    };
    let (fast, reference) = (top(&["--engine", "fast"]), top(&["--engine", "reference"]));
    for (a, b) in fast["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["predictions"].as_array().unwrap())
    {
        assert_eq!(a["class_index"], b["class_index"]);
        assert!((a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() < 1e-5);
    }
    let random = top(&["--random-init", "t0"]);
    let best = &random["predictions"][0];
    let index = best["class_index"].as_u64().unwrap();
    assert!(index < 1000);
    // ImageNet names, not `class_N`.
    assert!(!best["label"].as_str().unwrap().starts_with("class_"), "{random}");
}

/// `--engine auto` multiplies in bf16 exactly where that was measured faster: AMX tiles, or
/// AVX512-BF16 on AMD; judged here from /proc/cpuinfo, not from the binary's own detection.
#[test]
fn the_auto_engine_picks_bf16_where_it_is_faster() {
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        eprintln!("skipped: no /proc/cpuinfo");
        return;
    };
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").map(|f| f.trim_start_matches([' ', '\t', ':'])))
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let amd = cpuinfo.contains("AuthenticAMD");
    let (amx, bf16) = (
        flags.contains(&"amx_bf16") && flags.contains(&"amx_tile"),
        flags.contains(&"avx512_bf16") && flags.contains(&"avx512bw"),
    );
    let args = ["--variant", "t0", "--size", "32", "--batch", "1", "--threads", "1"];
    let out = run(&[&["bench", "--engine", "auto", "--seconds", "0.1"][..], &args].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let header = text(&out.stderr);
    let expected = if bf16 && amx {
        "fast-bf16 engine (AMX bf16 tiles)"
    } else if bf16 && amd {
        "fast-bf16 engine (AVX512-BF16)"
    } else {
        "fast engine ("
    };
    assert!(header.contains(expected), "expected `{expected}`: {header}");
}

/// The bundled model is in the binary: classify works from a directory with no weights/ and
/// answers exactly as the files in the checkout do.
#[test]
fn the_bundled_model_works_from_any_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = root.join("tests/fixtures/fashion_mnist_t10k_0.png");
    let elsewhere = tempfile::tempdir().unwrap();
    let classify = |dir: &Path, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
            .current_dir(dir)
            .args(["classify", "--json", "--top-k", "10"])
            .args(extra)
            .arg(&image)
            .env_remove("FASTERNET_WEIGHTS")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let embedded = classify(elsewhere.path(), &[]);
    let files = classify(root, &["--weights", root.join("weights").to_str().unwrap()]);
    assert_eq!(embedded, files);
    assert!(embedded.contains("Ankle boot"), "{embedded}");
}
