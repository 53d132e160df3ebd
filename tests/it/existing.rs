//! A file of the same name already in DIR: same content is not sent again, different content is
//! kept beside it, and --overwrite replaces it atomically.

use crate::util::{Receiver, send, source_file};

#[test]
fn identical_file_is_not_sent_again() {
    let rx = Receiver::start(&["--quiet"]);
    std::fs::write(rx.dir.join("img.jpg"), b"same bytes").unwrap();
    let (_src, path) = source_file("img.jpg", b"same bytes");
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(run.stdout().contains("already has it as \"img.jpg\""), "{}", run.report());
    rx.wait_log("already have it");
    rx.assert_files(&["img.jpg"]);
}

#[test]
fn identical_to_a_kept_copy_is_recognised() {
    let rx = Receiver::start(&["--quiet"]);
    std::fs::write(rx.dir.join("img.jpg"), b"old").unwrap();
    std::fs::write(rx.dir.join("img (1).jpg"), b"new").unwrap();
    let (_src, path) = source_file("img.jpg", b"new");
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(run.stdout().contains("already has it as \"img (1).jpg\""), "{}", run.report());
    rx.assert_files(&["img (1).jpg", "img.jpg"]);
}

#[test]
fn different_file_keeps_both() {
    let rx = Receiver::start(&["--quiet"]);
    std::fs::write(rx.dir.join("img.jpg"), b"old content").unwrap();
    let (_src, path) = source_file("img.jpg", b"new content");
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(run.stdout().contains("stored as \"img (1).jpg\""), "{}", run.report());
    let (_src2, path2) = source_file("img.jpg", b"third content");
    send(&path2, &rx.target(), &[]).expect(0);
    rx.assert_files(&["img (1).jpg", "img (2).jpg", "img.jpg"]);
    assert_eq!(std::fs::read(rx.dir.join("img.jpg")).unwrap(), b"old content");
    assert_eq!(std::fs::read(rx.dir.join("img (1).jpg")).unwrap(), b"new content");
    assert_eq!(std::fs::read(rx.dir.join("img (2).jpg")).unwrap(), b"third content");
}

#[test]
fn overwrite_replaces() {
    let rx = Receiver::start(&["--quiet", "--overwrite"]);
    std::fs::write(rx.dir.join("img.jpg"), b"old content").unwrap();
    let (_src, path) = source_file("img.jpg", b"new content");
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(run.stdout().contains("stored as \"img.jpg\""), "{}", run.report());
    rx.assert_files(&["img.jpg"]);
    assert_eq!(std::fs::read(rx.dir.join("img.jpg")).unwrap(), b"new content");
}

#[test]
fn a_folder_of_that_name_is_kept_too() {
    let rx = Receiver::start(&["--quiet", "--overwrite"]);
    std::fs::create_dir(rx.dir.join("data")).unwrap();
    let (_src, path) = source_file("data", b"file content");
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(run.stdout().contains("stored as \"data (1)\""), "{}", run.report());
    assert!(rx.dir.join("data").is_dir());
}

#[test]
fn symlink_in_dir_is_replaced_not_followed() {
    let rx = Receiver::start(&["--quiet", "--overwrite"]);
    let outside = rx.root.path().join("outside-target");
    std::os::unix::fs::symlink(&outside, rx.dir.join("link")).unwrap();
    let (_src, path) = source_file("link", b"payload");
    send(&path, &rx.target(), &[]).expect(0);
    assert!(!outside.exists(), "a write went through a symlink out of DIR");
    let meta = std::fs::symlink_metadata(rx.dir.join("link")).unwrap();
    assert!(meta.file_type().is_file(), "the symlink itself was replaced by the file");
}
