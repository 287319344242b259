-- A database made by Ember 0.1 (the release before tenants and Alembic: `metadata.create_all` of
-- src/ember/store.py at that release, no alembic_version table), dumped with `sqlite3 ember.db .dump`.
-- Made by that release's own code (`git archive <0.1 commit> src`, then Store.put_image / put_build /
-- insert_vm): 3 images (the built-in base `debian`, a build `web:1`, a snapshot `snap-a`), 2 builds
-- (one CREATED, one CREATE_FAILED) and 5 VMs (RUNNING, SUSPENDED by the user, SUSPENDED by a daemon
-- restart, RUNNING but unreachable after a restart, FAILED). tests/unit/test_db_migrate.py upgrades it.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE images (
	name VARCHAR NOT NULL, 
	machine TEXT NOT NULL, 
	gid INTEGER NOT NULL, 
	token VARCHAR NOT NULL, 
	disk_bytes INTEGER NOT NULL, 
	memory_bytes INTEGER NOT NULL, 
	created_at VARCHAR NOT NULL, 
	parent VARCHAR NOT NULL, 
	PRIMARY KEY (name), 
	UNIQUE (gid)
);
INSERT INTO images VALUES('debian','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',790000,'tok-debian-0123456789abcdef',2147483648,268435456,'2025-11-01T10:00:00.000+00:00','');
INSERT INTO images VALUES('web:1','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',790001,'tok-web1-0123456789abcdef',2147483648,268435456,'2025-11-02T11:00:00.000+00:00','debian');
INSERT INTO images VALUES('snap-a','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',790002,'tok-snapa-0123456789abcdef',2147483648,268435456,'2025-11-04T09:00:00.000+00:00','web:1');
CREATE TABLE builds (
	name VARCHAR NOT NULL, 
	repo VARCHAR NOT NULL, 
	version INTEGER NOT NULL, 
	state VARCHAR NOT NULL, 
	error TEXT NOT NULL, 
	step TEXT NOT NULL, 
	config TEXT NOT NULL, 
	steps TEXT NOT NULL, 
	disk_bytes INTEGER NOT NULL, 
	memory_bytes INTEGER NOT NULL, 
	seconds FLOAT NOT NULL, 
	created_at VARCHAR NOT NULL, 
	finished_at VARCHAR NOT NULL, 
	PRIMARY KEY (name)
);
INSERT INTO builds VALUES('web:1','web',1,'CREATED','','','{"cmd": ["python3", "-m", "http.server"], "env": {}, "workdir": "/app"}','[{"step": "FROM debian", "seconds": 0.4}]',2147483648,268435456,15.599999999999999644,'2025-11-02T10:59:40.000+00:00','2025-11-02T11:00:00.000+00:00');
INSERT INTO builds VALUES('web:2','web',2,'CREATE_FAILED','step 3 (RUN pip install flask) exited with status 1','RUN pip install flask','','',0,0,4.2000000000000001776,'2025-11-03T08:00:00.000+00:00','2025-11-03T08:00:04.200+00:00');
CREATE TABLE vms (
	id VARCHAR NOT NULL, 
	image VARCHAR NOT NULL, 
	state VARCHAR NOT NULL, 
	machine TEXT NOT NULL, 
	uid INTEGER NOT NULL, 
	token VARCHAR NOT NULL, 
	ram VARCHAR NOT NULL, 
	pid INTEGER NOT NULL, 
	state_reason VARCHAR NOT NULL, 
	next_token VARCHAR NOT NULL, 
	created_at VARCHAR NOT NULL, 
	updated_at VARCHAR NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (uid)
);
INSERT INTO vms VALUES('vm-0a1b2c3d4e5f','web:1','RUNNING','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',800100,'tok-vm-0a1b2c3d4e5f','clone',4242,'','','2025-11-05T12:00:00.000+00:00','2025-11-05T12:10:00.000+00:00');
INSERT INTO vms VALUES('vm-1b2c3d4e5f60','web:1','SUSPENDED','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',800101,'tok-vm-1b2c3d4e5f60','own',0,'user','','2025-11-05T12:01:00.000+00:00','2025-11-05T12:11:00.000+00:00');
INSERT INTO vms VALUES('vm-2c3d4e5f6071','debian','SUSPENDED','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',800102,'tok-vm-2c3d4e5f6071','own',0,'daemon_restart','','2025-11-05T12:02:00.000+00:00','2025-11-05T12:12:00.000+00:00');
INSERT INTO vms VALUES('vm-3d4e5f607182','debian','RUNNING','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',800103,'tok-vm-3d4e5f607182','clone',4343,'unreachable after a daemon restart: agent did not answer','','2025-11-05T12:03:00.000+00:00','2025-11-05T12:13:00.000+00:00');
INSERT INTO vms VALUES('vm-4e5f60718293','snap-a','FAILED','{"accel": "tcg", "cmdline": "console=ttyS0 reboot=t panic=-1 quiet", "initramfs": "/var/lib/ember/guest/initramfs.img", "kernel": "/var/lib/ember/guest/vmlinuz", "memory_mib": 256, "qemu_version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)", "vcpus": 1}',800104,'tok-vm-4e5f60718293','own',0,'vmm_exited','','2025-11-05T12:04:00.000+00:00','2025-11-05T12:14:00.000+00:00');
CREATE INDEX ix_builds_repo ON builds (repo);
COMMIT;
